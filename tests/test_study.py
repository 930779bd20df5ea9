"""The study runner (leapformer_fairseq.recipes.study, scripts/study.py; docs/quality.md) end to
end at tiny size: the recipe's prepare on a slice of gettext-mt, a study file of two rows (leap,
softmax) x two seeds of the ``_tiny`` architecture trained by real fairseq-train processes, two
at a time, then the SimulEval CLI with the text agent on the first test sentences.

Nothing here depends on what the undertrained models emit: the table is checked against what
the per-run records give (means, standard deviations, ratios and differences to the reference
row, sacrebleu's paired bootstrap recomputed from SimulEval's instances.log), whatever the
scores are. The runs train on one torch thread (OMP_NUM_THREADS=1), untied embeddings and no
dropout so that a few dozen updates leave the unigram plateau (where the model writes only the
SentencePiece word boundary, which SimulEval would record as no output at all).
"""
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from leapformer_fairseq.modules import ATTN_TYPES
from leapformer_fairseq.recipes import study, t2t
from leapformer_fairseq.recipes.config import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
UPDATES = 40
SENTENCES = 8
ROWS = ("leap", "softmax")
SEEDS = (1, 2)
WAITK = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread_training():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def main(*arguments) -> str:
    """``scripts/study.py`` in this process; returns what it logged."""
    output = io.StringIO()
    with redirect_stdout(output):
        study.main([str(a) for a in arguments])
    return output.getvalue()


def refusal(*arguments) -> str:
    with pytest.raises(SystemExit) as refused:
        main(*arguments)
    return str(refused.value.code)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "data"
    with redirect_stdout(io.StringIO()):
        t2t.main(["prepare", "--corpus", str(TSV), "--out", str(out), "--max-train", "200",
                  "--max-valid", "10", "--max-test", "10", "--vocab-size", "1500"])
    return out


def write_study(path: Path, data: Path, shared=None, section=None, text=None) -> Path:
    """A study file of the two rows at tiny size, with ``shared`` fairseq-train options and
    ``section`` study keys changed (a value ``None`` removes the key), or ``text`` as it is."""
    if text is None:
        options = {"arch": "leapformer_waitk_transformer_tiny", "share-all-embeddings": False,
                   "dropout": 0, "label-smoothing": 0, "lr": 0.01, "warmup-updates": 10,
                   "max-tokens": 1000, "max-update": UPDATES, "log-interval": 10}
        keys = {"data": str(data), "seeds": list(SEEDS), "waitk": [WAITK],
                "reference": "softmax", "rows": {row: {"attn-type": row} for row in ROWS}}
        for mapping, changes in ((options, shared), (keys, section)):
            for key, value in (changes or {}).items():
                mapping.pop(key, None) if value is None else mapping.__setitem__(key, value)
        text = yaml.safe_dump({"recipe": "t2t study", "extends": "t2t/small",
                               "fairseq-train": options, "study": keys}, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def done(data, tmp_path_factory) -> SimpleNamespace:
    """The study trained (two at a time), run again, evaluated and evaluated again."""
    folder = tmp_path_factory.mktemp("tiny")
    path = write_study(folder / "tiny.yaml", data)
    out = folder / "out"
    logs = {"run": main("run", path, "--out", out, "--jobs", 2, "--cpu")}
    checkpoints = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint_last.pt")}
    logs["rerun"] = main("run", path, "--out", out, "--jobs", 2, "--cpu")
    logs["evaluate"] = main("evaluate", path, "--out", out, "--sentences", SENTENCES,
                            "--jobs", 2)
    logs["reevaluate"] = main("evaluate", path, "--out", out, "--sentences", SENTENCES)
    return SimpleNamespace(path=path, out=out, data=data, logs=logs, checkpoints=checkpoints,
                           results=json.loads((out / "results.json").read_text()))


def run_dirs(out: Path):
    return {(row, seed): out / row / f"k{WAITK}_seed{seed}" for row in ROWS for seed in SEEDS}


# ------------------------------------------------------------------------------ training
def test_every_run_trains_in_its_own_directory_with_its_record(done):
    for (row, seed), directory in run_dirs(done.out).items():
        record = json.loads((directory / "run.json").read_text())
        assert (record["row"], record["waitk"], record["seed"]) == (row, WAITK, seed)
        assert record["updates"] == record["max_update"] == UPDATES and record["finished"]
        config = yaml.safe_load((directory / "config.yaml").read_text())
        options = config["fairseq-train"]
        assert config["recipe"] == "t2t train"  # a configuration: train --config retrains it
        assert [options[f"{b}-attn-type"] for b in ("encoder", "decoder", "cross")] == [row] * 3
        assert (options["seed"], options["waitk-lagging"], options["cpu"]) == (seed, WAITK, True)
        assert f"--save-dir {directory}" in record["sessions"][0]["command"]
        assert record["sessions"][0]["device"]["kind"] == "cpu"
        assert record["sessions"][0]["device"]["threads_per_run"] == 1
        curve = record["valid_curve"]
        assert curve and curve[-1][0] == UPDATES
        assert record["valid_loss"] == curve[-1][1]
        assert record["best_valid_loss"] == min(loss for _, loss in curve)
        assert f"num_updates {UPDATES}" in (directory / "train.log").read_text()
    log = done.logs["run"]
    for row in ROWS:
        for seed in SEEDS:
            assert log.count(f" start {row} k{WAITK} seed {seed} on CPU") == 1
            assert log.count(f" done {row} k{WAITK} seed {seed}: {UPDATES} updates, valid loss ") \
                == 1


def test_a_rerun_skips_finished_runs(done):
    assert done.logs["rerun"].count(f": finished ({UPDATES} updates)") == 4
    assert " start " not in done.logs["rerun"]
    assert {p: p.stat().st_mtime_ns for p in done.out.rglob("checkpoint_last.pt")} == \
        done.checkpoints
    assert done.logs["reevaluate"].count(": evaluated (") == 4
    assert "simuleval.cli" not in done.logs["reevaluate"]


# ---------------------------------------------------------------------------------- table
def recomputed(values):
    values = [v for v in values if v is not None]
    return (statistics.fmean(values) if values else None,
            statistics.stdev(values) if len(values) > 1 else None)


def close(a, b):
    return a is None and b is None or a == pytest.approx(b, abs=1e-9)


def test_the_table_is_what_the_run_records_give(done):
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    records, evals = {}, {}
    for key, directory in run_dirs(done.out).items():
        records[key] = json.loads((directory / "run.json").read_text())
        evals[key] = json.loads((directory / f"eval_checkpoint_last_{SENTENCES}" /
                                 "eval.json").read_text())
        assert evals[key]["sentences"] == SENTENCES and evals[key]["updates"] == UPDATES
        log = directory / f"eval_checkpoint_last_{SENTENCES}" / "instances.log"
        assert len(log.read_text().splitlines()) == SENTENCES
    rows = {row["row"]: row for row in done.results["rows"]}
    assert list(rows) == list(ROWS)
    for row in ROWS:
        result = rows[row]
        assert result["waitk"] == WAITK and result["seeds"] == result["seeds_evaluated"] == \
            list(SEEDS)
        for name, values in (
                ("valid_loss", [records[row, s]["valid_loss"] for s in SEEDS]),
                ("best_valid_loss", [records[row, s]["best_valid_loss"] for s in SEEDS]),
                *((metric, [evals[row, s]["scores"][metric] for s in SEEDS])
                  for metric in ("BLEU", "AL", "LAAL", "AP", "DAL"))):
            mean, std = recomputed(values)
            assert close(result[name]["mean"], mean) and close(result[name]["std"], std), name
        ratios, differences, p_values = [], [], {}
        for seed in SEEDS:
            scores, reference = evals[row, seed]["scores"], evals["softmax", seed]["scores"]
            if row == "softmax":
                ratios.append(1.0)
            else:
                ratios.append(scores["BLEU"] / reference["BLEU"] if reference["BLEU"] > 0
                              else None)
            differences.append(scores["AL"] - reference["AL"])
            if row != "softmax":
                p_values[str(seed)] = paired_p(done.out, row, seed, BLEU, PairedTest,
                                               scores["BLEU"], reference["BLEU"])
        for name, values in (("bleu_ratio", ratios), ("al_diff", differences)):
            mean, std = recomputed(values)
            assert close(result[name]["mean"], mean) and close(result[name]["std"], std), name
        if row == "softmax":
            assert result["bleu_ratio"]["mean"] == 1.0 and result["al_diff"]["mean"] == 0.0
            assert result["p_value"] is None and result["p_values"] == {}
        else:
            assert result["p_values"] == pytest.approx(p_values)
            assert result["p_value"] == max(p_values.values())
            assert all(0 < p <= 1 for p in p_values.values())
    runs = {(run["row"], run["seed"]): run for run in done.results["runs"]}
    for key, run in runs.items():
        assert run["valid_loss"] == records[key]["valid_loss"]
        assert run["eval"]["BLEU"] == evals[key]["scores"]["BLEU"]
    table = (done.out / "results.md").read_text()
    for row in ROWS:
        assert f"| {row} | {WAITK} | 2 | {UPDATES} | " in table
    assert "| softmax | 2 | 2 | 40 |" in table and "| 1.000 ± 0.000 | +0.00 | - |" in table
    assert "python scripts/study.py evaluate" in table and "Training devices: CPU" in table
    assert (done.out / "bleu_vs_al.png").stat().st_size > 1000
    assert done.results["evaluation"] == {"checkpoint": "checkpoint_last.pt",
                                          "sentences": SENTENCES}


def paired_p(out, row, seed, BLEU, PairedTest, bleu, reference_bleu):
    """sacrebleu's paired bootstrap of one seed's pair, from the SimulEval logs; its BLEU
    scores equal SimulEval's (so the hypotheses are the strings SimulEval scored)."""
    def predictions(name):
        path = out / name / f"k{WAITK}_seed{seed}" / f"eval_checkpoint_last_{SENTENCES}" / \
            "instances.log"
        records = sorted((json.loads(line) for line in path.read_text().splitlines()),
                         key=lambda r: r["index"])
        return [r["prediction"] for r in records], [r["reference"] for r in records]

    hypotheses, references = predictions(row)
    baseline, _ = predictions("softmax")
    _, scores = PairedTest([("softmax", baseline), (row, hypotheses)], {"BLEU": BLEU()},
                           [references], test_type="bs", n_samples=1000)()
    assert scores["BLEU"][0].score == pytest.approx(reference_bleu, abs=6e-4)
    assert scores["BLEU"][1].score == pytest.approx(bleu, abs=6e-4)
    tie = scores["BLEU"][0].score == scores["BLEU"][1].score
    return 1.0 if tie else scores["BLEU"][1].p_value


def test_one_seed_shows_no_standard_deviation():
    result = study.stats([4.2])
    assert result == {"mean": 4.2, "std": None, "n": 1}
    assert study.mean_std(result, 3) == "4.200 ± -"
    assert study.mean_std(study.stats([1.0, 3.0]), 2, seeds=3) == "2.00 ± 1.41 (2 of 3 seeds)"


def test_table_writes_the_same_results_again(done):
    log = main("table", done.path, "--out", done.out)
    assert "| leap | 2 | 2 | 40 |" in log
    again = json.loads((done.out / "results.json").read_text())
    assert again["rows"] == done.results["rows"] and again["runs"] == done.results["runs"]


# --------------------------------------------------------------------------- multi-path
def test_a_multipath_model_is_evaluated_at_every_k_beside_per_k_models(data, tmp_path):
    """waitk: [2, 1-3]: per row a wait-2 model and one multi-path model, the latter evaluated
    at k = 1, 2, 3 from its one checkpoint, each against the reference's multi-path model at
    the same k; the table has a line per k."""
    path = write_study(tmp_path / "multi.yaml", data,
                       section={"seeds": [1], "waitk": [WAITK, "1-3"]})
    out = tmp_path / "out"
    main("run", path, "--out", out, "--jobs", 2, "--cpu")
    log = main("evaluate", path, "--out", out, "--sentences", 4, "--jobs", 2)
    assert "evaluate: 8 evaluation(s) of 4 run(s)" in log
    results = json.loads((out / "results.json").read_text())
    for row in ROWS:
        multi = out / row / "k1-3_seed1"
        record = json.loads((multi / "run.json").read_text())
        assert record["waitk"] == "1-3" and record["args"]["waitk_lagging"] == "1-3"
        assert not (multi / "eval_checkpoint_last_4").exists()
        instances = {}
        for k in (1, 2, 3):
            evaluation = json.loads((multi / f"eval_checkpoint_last_4_k{k}" /
                                     "eval.json").read_text())
            assert evaluation["waitk"] == k and f"--waitk {k} " in evaluation["command"]
            assert evaluation["checkpoint"] == str(multi / "checkpoint_last.pt")
            instances[k] = (multi / f"eval_checkpoint_last_4_k{k}" / "instances.log").read_text()
            lines = [line for line in results["rows"] if line["row"] == row
                     and line["trained"] == "1-3" and line["waitk"] == k]
            assert len(lines) == 1 and lines[0]["BLEU"]["mean"] == evaluation["scores"]["BLEU"]
        # wait-1 reads less source before each write than wait-3
        delays = {k: [json.loads(line)["delays"] for line in instances[k].splitlines()]
                  for k in instances}
        assert all(a <= b for d1, d3 in zip(delays[1], delays[3]) for a, b in zip(d1, d3))
        assert delays[1] != delays[3]
        single = [line for line in results["rows"] if line["row"] == row
                  and line["trained"] == WAITK]
        assert [line["waitk"] for line in single] == [WAITK]
    leap = {line["waitk"]: line for line in results["rows"]
            if line["row"] == "leap" and line["trained"] == "1-3"}
    for k, line in leap.items():
        softmax = json.loads((out / "softmax" / "k1-3_seed1" / f"eval_checkpoint_last_4_k{k}" /
                              "eval.json").read_text())["scores"]
        assert line["al_diff"]["mean"] == pytest.approx(line["AL"]["mean"] - softmax["AL"])
        assert line["p_value"] is not None
    table = (out / "results.md").read_text()
    assert "| leap | 3 (multi-path 1-3) | 1 | 40 |" in table
    assert f"| leap | {WAITK} | 1 | 40 |" in table


# ---------------------------------------------------------------------------- adoption
def test_a_run_trained_elsewhere_is_adopted_only_with_the_studys_options(done, tmp_path):
    """A finished run of the study, adopted into a new output directory as the run it is, then
    skipped by ``run``; adopting it as another row, seed, data or budget is refused by name."""
    out = tmp_path / "out"
    source = done.out / "leap" / f"k{WAITK}_seed1"
    checkpoint = source / "checkpoint_last.pt"

    def adopt(*extra, path=done.path, row="leap", seed=1):
        return ("adopt", path, "--out", out, "--row", row, "--seed", seed, "--from", source,
                *extra)

    refused = refusal(*adopt(row="softmax"))
    assert refused.startswith(f"[study] adopt: {checkpoint} was trained with other options "
                              f"than softmax k{WAITK} seed 1 of {done.path} (")
    for block in ("encoder", "decoder", "cross"):
        assert f"{block}_attn_type: leap there, softmax in the study" in refused
    assert refusal(*adopt(seed=2)) == (
        f"[study] adopt: {checkpoint} was trained with other options than leap k{WAITK} seed 2 "
        f"of {done.path} (seed: 1 there, 2 in the study)")
    other_data = shutil.copytree(done.data, tmp_path / "data")
    assert refusal(*adopt("--data", other_data)) == (
        f"[study] adopt: {checkpoint} was trained with other options than leap k{WAITK} seed 1 "
        f"of {done.path} (data: {done.data / 'data-bin'} there, {other_data / 'data-bin'} in "
        "the study)")
    longer = write_study(tmp_path / "longer.yaml", done.data,
                         shared={"max-update": UPDATES + 10})
    assert refusal(*adopt(path=longer)) == (
        f"[study] adopt: {checkpoint} is at {UPDATES} updates; the study trains leap k{WAITK} "
        f"seed 1 to max-update {UPDATES + 10}")
    assert refusal(*adopt(row="leap,softmax")) == \
        "[study] adopt: --row and --seed name one run; got --row leap,softmax --seed 1"
    assert refusal(*adopt(seed=3)) == (
        f"[study] adopt: --seed 3: '3' is not a seed of {done.path} (seeds: 1, 2)")
    assert refusal("adopt", done.path, "--out", out, "--row", "leap", "--seed", 1, "--from",
                   tmp_path) == f"[study] adopt: --from {tmp_path}: no checkpoint_last.pt in " \
                                f"{tmp_path}"
    assert not out.exists()

    log = main(*adopt())
    target = out / "leap" / f"k{WAITK}_seed1"
    assert f"adopt: leap k{WAITK} seed 1 from {source} ({UPDATES} updates, valid loss " in log
    for path in source.iterdir():
        if path.is_file() and path.name != "run.json":
            assert (target / path.name).read_bytes() == path.read_bytes()
            assert not (target / path.name).samefile(path)  # a resume must not write there
    record = json.loads((target / "run.json").read_text())
    trained = json.loads((source / "run.json").read_text())
    assert (record["row"], record["seed"], record["updates"], record["finished"]) == \
        ("leap", 1, UPDATES, True)
    assert record["valid_curve"] == trained["valid_curve"]
    session = record["sessions"][0]
    assert session["adopted_from"] == str(source) and session["device"] == {"kind": "unrecorded"}
    assert session["command"].startswith("fairseq-train ") and f"--save-dir {source}" in \
        session["command"]
    assert 0 <= session["seconds"] <= trained["train_seconds"] + 2
    assert refusal(*adopt()) == \
        f"[study] adopt: {target} already holds a run; delete it first"
    rerun = main("run", done.path, "--out", out, "--rows", "leap", "--seeds", 1, "--dry-run",
                 "--cpu")
    assert f"skip leap k{WAITK} seed 1: finished ({UPDATES} updates)" in rerun
    assert "run: 0 of 1 run(s) to train" in rerun
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(run["row"], run["seed"], run["devices"]) for run in runs] == \
        [("leap", 1, ["not recorded (adopted run)"])]


# ------------------------------------------------------------------ partial runs, changes
def test_partial_runs_are_refused_and_resumed_only_when_asked(done, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(done.out, out)
    more = f"max-update={UPDATES + 4}"
    message = refusal("run", done.path, "--out", out, "--cpu", "--set", more)
    assert message == (f"[study] run: {out / 'leap' / 'k2_seed1'} is partial (checkpoint_last.pt "
                       f"at {UPDATES} of {UPDATES + 4} updates), and 3 more run(s); --resume "
                       "continues partial runs from their checkpoint_last.pt, or delete them")
    assert refusal("run", done.path, "--out", out, "--cpu", "--set", "lr=0.5") == (
        f"[study] run: {out / 'leap' / 'k2_seed1'} holds a run with other options (lr: 0.01 "
        "there, 0.5 now); delete it or choose another --out")
    assert refusal("run", done.path, "--out", out, "--cpu", "--set",
                   f"max-update={UPDATES - 1}") == (
        f"[study] run: {out / 'leap' / 'k2_seed1' / 'checkpoint_last.pt'} is at {UPDATES} "
        f"updates, past the max-update {UPDATES - 1} the study now sets; choose another --out")

    log = main("run", done.path, "--out", out, "--cpu", "--jobs", 2, "--rows", "leap",
               "--set", more, "--resume")
    assert log.count(f"(resuming at {UPDATES} updates)") == 2
    for seed in SEEDS:
        directory = out / "leap" / f"k2_seed{seed}"
        record = json.loads((directory / "run.json").read_text())
        assert record["updates"] == UPDATES + 4 and record["finished"]
        assert [s["from_updates"] for s in record["sessions"]] == [0, UPDATES]
        assert (directory / "train.1.log").is_file()  # the first session's log, kept
        assert record["valid_curve"][-1][0] == UPDATES + 4
        assert any(u == UPDATES for u, _ in record["valid_curve"])
    results = json.loads((out / "results.json").read_text())
    rows = {row["row"]: row for row in results["rows"]}
    # leap's evaluation is of the checkpoint it has replaced: left out, not reused
    assert rows["leap"]["seeds_evaluated"] == [] and rows["leap"]["BLEU"]["mean"] is None
    assert rows["leap"]["updates"] == [UPDATES + 4] and rows["softmax"]["updates"] == [UPDATES]
    assert rows["softmax"]["seeds_evaluated"] == list(SEEDS)


def test_a_run_recorded_before_the_feature_map_default_changed_counts_as_relu(done, tmp_path):
    """A run recorded while ``--leap-feature-map`` was unset (its default was relu) is a relu
    run: the same as one asked for with relu, and another than one with hedgehog."""
    out = tmp_path / "out"
    shutil.copytree(done.out, out)
    record_path = out / "leap" / f"k{WAITK}_seed1" / "run.json"
    record = json.loads(record_path.read_text())
    assert record["args"]["leap_feature_map"] == "hedgehog"  # t2t/small's, recorded
    record["args"]["leap_feature_map"] = None
    del record["options"]["leap-feature-map"]
    record_path.write_text(json.dumps(record))
    only = ("--out", out, "--cpu", "--rows", "leap", "--seeds", "1")
    assert refusal("run", done.path, *only) == (
        f"[study] run: {out / 'leap' / f'k{WAITK}_seed1'} holds a run with other options "
        "(leap-feature-map: relu there, hedgehog now); delete it or choose another --out")
    log = main("run", done.path, *only, "--set", "leap-feature-map=relu")
    assert log.count(f": finished ({UPDATES} updates)") == 1 and " start " not in log


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, message", [
    (dict(section={"seed": 3}), "FILE: study: unknown key 'seed' (a study holds data, out, "
                                "seeds, waitk, reference, rows, simuleval)"),
    (dict(section={"reference": "cosformer"}),
     "FILE: study: reference: 'cosformer' is not a row (rows: leap, softmax)"),
    (dict(section={"reference": None}), "FILE: study: no reference (the row the others are "
                                        "compared with, e.g. reference: softmax)"),
    (dict(section={"seeds": [1, "two"]}),
     "FILE: study: seeds: integers >= 0 (one or a list), got [1, 'two']"),
    (dict(section={"rows": {"leap": {"attn-type": "leap", "no-such-option": 1},
                            "softmax": {"attn-type": "softmax"}}}),
     "FILE: rows: leap: fairseq-train has no option --no-such-option (with --arch "
     "leapformer_waitk_transformer_tiny and --task translation)"),
    (dict(section={"rows": {"leap": {"encoder-attn-type": "fast"}, "softmax": None}}),
     "FILE: rows: leap: fairseq-train refuses it: argument --encoder-attn-type: invalid choice: "
     "'fast' (choose from 'leap', 'cosformer', 'linear', 'hedgehog', 'softmax')"),
    (dict(section={"rows": {"leap": {"attn-type": "leap", "seed": 2}}}),
     "FILE: rows: leap: seed is set for every run by study: seeds; leave it out"),
    (dict(section={"rows": {"leap": {"attn-type": "leap-fast"}}}),
     "FILE: rows: leap: attn-type leap-fast: one of leap, cosformer, linear, hedgehog, softmax, "
     "or three of them joined by - (encoder-decoder-cross, e.g. leap-leap-softmax)"),
    (dict(section={"rows": {"leap/1": {"attn-type": "leap"}}}),
     "FILE: rows: leap/1: a row name is letters, digits and _ . + - (it names the row's "
     "directory)"),
    (dict(section={"simuleval": {"checkpoint": "x.pt"}}),
     "FILE: study: simuleval: checkpoint is set by the runner; leave it out"),
    (dict(shared={"waitk-lagging": 3}),
     "FILE: fairseq-train: waitk-lagging is set for every run by study: waitk; leave it out"),
    (dict(section={"data": 3}), "FILE: study: data: a directory, got 3"),
    (dict(section={"waitk": [2, 2]}), "FILE: study: waitk: [2, 2] repeats a value"),
    (dict(section={"waitk": ["2", 2]}),  # a quoted single k is the integer
     "FILE: study: waitk: ['2', 2] repeats a value"),
    (dict(section={"waitk": [2, "3-1"]}),
     "FILE: study: waitk: integers >= 1 or multi-path sets such as 1-9 (one or a list), got "
     "[2, '3-1']"),
    (dict(section={"rows": ["leap", "softmax"]}),
     "FILE: study: rows: a mapping of row name -> fairseq-train options, got list"),
    (dict(section={"rows": {"leap": "leap", "softmax": None}}),
     "FILE: rows: leap: a mapping of fairseq-train options, got str"),
    (dict(section={"rows": {"leap": {"--lr": 0.1}, "softmax": None}}),
     "FILE: rows: leap: '--lr' is not a fairseq-train option name (the flag without its leading "
     "--, e.g. max-update)"),
    (dict(section={"simuleval": ["threads", 2]}),
     "FILE: study: simuleval: a mapping of SimulEval and agent flags (without --), got list"),
    (dict(text="recipe: t2t study\nextends: t2t/small\n"),
     "FILE: study: a mapping with the keys data, out, seeds, waitk, reference, rows, simuleval; "
     "got NoneType"),
    (dict(text="recipe: t2t train\nextends: t2t/small\nstudy: {}\n"),
     "FILE: recipe: t2t train; a study file says recipe: t2t study (and extends: its base "
     "configuration)"),
    (dict(text="recipe: t2t study\nextends: t2t/small\nstudies: {}\n"),
     "FILE: unknown key 'studies' (a configuration holds recipe, extends, fairseq-train, "
     "study; fairseq-train options go under fairseq-train:)"),
])
def test_a_bad_study_file_is_refused_naming_the_file_and_key(data, tmp_path, change, message):
    path = write_study(tmp_path / "bad.yaml", data, **change)
    refused = refusal("run", path, "--out", tmp_path / "out", "--cpu")
    assert refused == "[study] run: " + message.replace("FILE", str(path))
    assert not (tmp_path / "out").exists()


def test_bad_flags_and_missing_inputs_are_refused(data, tmp_path, done):
    path = write_study(tmp_path / "s.yaml", data)
    out = tmp_path / "out"
    assert refusal("run", tmp_path / "none.yaml") == \
        f"[study] run: {tmp_path / 'none.yaml'}: no such study file"
    assert refusal("run", "studies/nothing") == (
        f"[study] run: studies/nothing: no study file {CONFIGS / 'studies' / 'nothing.yaml'}; "
        "available: studies/t2t_confirm_en_de, studies/t2t_confirm_en_es, studies/t2t_kd_en_de, "
        "studies/t2t_multipath_en_de, studies/t2t_screen_en_de")
    assert refusal("run", path, "--data", tmp_path / "nowhere") == (
        f"[study] run: {tmp_path / 'nowhere' / 'data-bin'} not found (--data "
        f"{tmp_path / 'nowhere'}); run scripts/t2t_recipe.py prepare --out "
        f"{tmp_path / 'nowhere'} first")
    nodata = write_study(tmp_path / "nodata.yaml", data, section={"data": None})
    assert refusal("evaluate", nodata) == \
        f"[study] evaluate: no data directory: set study: data: in {nodata} or pass --data"
    assert refusal("run", path, "--out", out, "--rows", "leap,linear") == (
        f"[study] run: --rows leap,linear: 'linear' is not a row of {path} (rows: leap, "
        "softmax)")
    assert refusal("run", path, "--out", out, "--seeds", "2,x") == (
        f"[study] run: --seeds 2,x: 'x' is not a seed of {path} (seeds: 1, 2)")
    assert refusal("evaluate", path, "--out", out, "--seeds", "3") == (
        f"[study] evaluate: --seeds 3: '3' is not a seed of {path} (seeds: 1, 2)")
    assert refusal("run", path, "--out", out, "--set", "seed=3") == \
        "[study] run: --set seed=3: seed is set for every run by study: seeds; leave it out"
    assert refusal("run", path, "--out", out, "--set", "lr") == \
        "[study] run: --set lr: expected KEY=VALUE (e.g. --set lr=0.0005)"
    assert refusal("run", path, "--out", out, "--jobs", 0) == \
        "[study] run: --jobs must be >= 1, got 0"
    assert refusal("evaluate", path, "--out", out, "--jobs", 0) == \
        "[study] evaluate: --jobs must be >= 1, got 0"
    assert refusal("evaluate", path, "--out", out, "--rows", "leap") == (
        f"[study] evaluate: missing {out / 'leap' / 'k2_seed1' / 'checkpoint_last.pt'}; train "
        f"it first: scripts/study.py run {path} --rows leap")
    assert not out.exists()
    (out / "leap" / "k2_seed1").mkdir(parents=True)
    (out / "leap" / "k2_seed1" / "notes.txt").write_text("mine")
    assert refusal("run", path, "--out", out) == (
        f"[study] run: {out / 'leap' / 'k2_seed1'} exists but holds no run record (run.json); "
        "delete it or choose another --out")
    assert list(out.rglob("*")) == [out / "leap", out / "leap" / "k2_seed1",
                                    out / "leap" / "k2_seed1" / "notes.txt"]


def copy(done, folder: Path) -> Path:
    shutil.copytree(done.out, folder)
    return folder


def test_damaged_or_unfinished_records_are_named(done, tmp_path):
    """States a killed run or a damaged file leaves, made by hand on copies of the study."""
    out = copy(done, tmp_path / "checkpoint")
    checkpoint = out / "leap" / "k2_seed1" / "checkpoint_last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert refusal("run", done.path, "--out", out, "--cpu").startswith(
        f"[study] {checkpoint}: not a readable fairseq checkpoint (")

    out = copy(done, tmp_path / "unfinished")  # a run killed mid-way: its record not finished
    record_path = out / "leap" / "k2_seed1" / "run.json"
    record = json.loads(record_path.read_text())
    record.update(finished=False, updates=20)
    record_path.write_text(json.dumps(record))
    assert refusal("evaluate", done.path, "--out", out) == (
        f"[study] evaluate: {out / 'leap' / 'k2_seed1'} is not finished (20 of {UPDATES} "
        f"updates); finish it first: scripts/study.py run {done.path} --resume")

    out = copy(done, tmp_path / "sentences")  # an evaluation cut short by hand
    log = out / "softmax" / "k2_seed1" / f"eval_checkpoint_last_{SENTENCES}" / "instances.log"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    assert refusal("table", done.path, "--out", out) == (
        f"[study] table: {log.parent} and "
        f"{out / 'leap' / 'k2_seed1' / f'eval_checkpoint_last_{SENTENCES}'} hold different test "
        "sentences")


def test_failing_trainings_and_evaluations_are_named_after_the_others_ran(done, data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "data-bin").mkdir(parents=True)  # fairseq-train fails on it
    path = write_study(tmp_path / "fail.yaml", empty, section={
        "seeds": [1], "reference": "leap", "rows": {"leap": {"attn-type": "leap"}}})
    out = tmp_path / "failed"
    log = out / "leap" / "k2_seed1" / "train.log"
    assert refusal("run", path, "--out", out, "--cpu") == (
        f"[study] run: 1 of 1 run(s) failed: leap k2 seed 1: fairseq-train failed (exit code 1); "
        f"its output is in {log}")
    assert json.loads(log.with_name("run.json").read_text())["sessions"][0]["exit_code"] == 1
    assert (out / "results.md").is_file()

    out = copy(done, tmp_path / "evaluated")
    path = write_study(tmp_path / "flag.yaml", data, section={
        "seeds": [1], "simuleval": {"no-such-flag": 1}})  # SimulEval's parser refuses it
    logs = [out / row / "k2_seed1" / f"eval_checkpoint_last_{SENTENCES}" / "simuleval.log"
            for row in ROWS]
    assert refusal("evaluate", path, "--out", out, "--sentences", SENTENCES, "--jobs", 2) == (
        f"[study] evaluate: 2 of 2 evaluation(s) failed: [1/2] simuleval leap k2 seed 1 failed "
        f"(exit code 2); its output is in {logs[0]} | [2/2] simuleval softmax k2 seed 1 failed "
        f"(exit code 2); its output is in {logs[1]}")
    assert "unrecognized arguments: --no-such-flag 1" in logs[0].read_text()


def test_a_refusal_through_the_command_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), "run",
                           str(tmp_path / "none.yaml")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"[study] run: {tmp_path / 'none.yaml'}: no such study file"


# ---------------------------------------------------------------------- committed studies
def test_the_committed_studies_resolve_with_the_same_data_for_every_row(data, tmp_path):
    """Every run of the committed studies passes fairseq-train's parser (a dry run against the
    tiny data directory). Screening: every row at the screening size with max positions 80, so
    all rows see the same pairs, for 1,000 updates (the fine-tuned row: 500 after 500).
    Confirmation and multi-path: t2t/small's model (max positions unset: the model's 1024),
    1,000 updates."""
    screen = [
        "leap", "softmax", "linear", "cosformer", "hedgehog", "enc-linear", "dec-linear",
        "cross-linear", "leap-prenorm", "softmax-prenorm", "leap-4heads", "softmax-4heads",
        "leap-eps0.01", "leap-eps1e-4", "leap-inputnorm", "leap-lr5e-4", "leap-lr2e-3",
        "softmax-lr2e-3", "leap-warmup1000", "leap-from-softmax", "enc-leap", "dec-leap",
        "cross-leap", "leap-hedgehog"]
    confirm = ["leap", "softmax", "hedgehog", "leap-hedgehog"]
    expected = {  # name: rows, base, seeds, k, data
        "studies/t2t_confirm_en_de": (confirm, "t2t/small", [1, 2, 3], [3], "work/gettext-en-de"),
        "studies/t2t_confirm_en_es": (confirm, "t2t/small", [1, 2, 3], [3], "work/gettext-en-es"),
        "studies/t2t_kd_en_de": (["leap", "softmax"], "t2t/screen", [1], [3],
                                 "work/gettext-en-de-kd"),
        "studies/t2t_multipath_en_de": (["leap", "softmax"], "t2t/small", [1], [3, 5, "1-9"],
                                        "work/gettext-en-de"),
        "studies/t2t_screen_en_de": (screen, "t2t/screen", [1], [3], "work/gettext-en-de")}
    assert study.available_studies() == list(expected)
    for name, (rows, base, seeds, waitks, data_dir) in expected.items():
        loaded = study.load_study(name)
        assert list(loaded.rows) == rows
        assert (loaded.base, loaded.seeds, loaded.waitks, loaded.reference, loaded.data) == \
            (base, seeds, waitks, "softmax", data_dir)
        log = main("run", name, "--data", data, "--out", tmp_path / name, "--dry-run", "--cpu")
        assert log.count(" would start ") == len(rows) * len(seeds) * len(waitks)
        screening = base == "t2t/screen"
        for row in rows:
            run = study.GridRun(row, 3, 1, tmp_path)
            args = study.resolve_run(loaded, run, data, [], (True, "--cpu")).args
            assert (args.max_update, getattr(args, "max_source_positions", None),
                    getattr(args, "max_target_positions", None), args.arch,
                    args.encoder_embed_dim) == (
                500 if row == "leap-from-softmax" else 1000, 80 if screening else None,
                80 if screening else None, "leapformer_waitk_transformer_small",
                128 if screening else 256)
            types = (args.encoder_attn_type, args.decoder_attn_type, args.cross_attn_type)
            if row in ATTN_TYPES:
                assert types == (row,) * 3
                assert getattr(args, "cosformer_max_positions", None) == (
                    80 if row == "cosformer" else None)  # unset: the model's 1024
            assert args.leap_feature_map == (  # the studies ran before hedgehog was t2t/small's
                "hedgehog" if row == "leap-hedgehog" else "relu")
    assert not (tmp_path / "studies").exists()  # a dry run writes nothing
