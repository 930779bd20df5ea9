"""Simultaneous speech-to-text recipe: prepare -> ASR pre-training -> wait-k ST -> SimulEval.

    python scripts/s2t_recipe.py prepare --data-root MUSTC_ROOT --lang de --out work/s2t-en-de
    python scripts/s2t_recipe.py train-asr --data work/s2t-en-de --config s2t/asr_base
    python scripts/s2t_recipe.py train-st --data work/s2t-en-de --config s2t/st_base
    python scripts/s2t_recipe.py evaluate --data work/s2t-en-de --attn-types leap,softmax --waitk 5
    python scripts/s2t_recipe.py demo      # TTS slice -> all of the above, tiny models (make demo)
    python scripts/s2t_recipe.py receive --from DEVICE_OUT --data-root TTS_ROOT --out DATA
    python scripts/s2t_recipe.py package --data DATA --checkpoint RUN/checkpoint_last.pt --out MODEL
    python scripts/s2t_recipe.py show --model MODEL --data DATA --test-set heldout

``prepare`` runs ``scripts/prep_mustc.py`` (the real MuST-C layout, or the output of
``scripts/make_tts_corpus.py``) and cuts the evaluation split's segments into wav files for
SimulEval. ``train-asr`` pre-trains a ``leapformer_s2t_waitk`` model on the English transcripts
(configuration ``s2t/asr_*``); ``train-st`` trains the wait-k ST model (``s2t/st_*``) with its
encoder initialised from that ASR model (``--load-pretrained-encoder-from``). ``evaluate`` runs
the ``simuleval`` CLI with the speech agent and ``--computation-aware``, then re-scores each
run's instances.log with SimulEval's own scorers for plain and computation-aware latency side by
side (:mod:`leapformer_fairseq.simuleval_scores`; SimulEval 1.1.4's ``--computation-aware`` makes
its plain columns computation-aware too). ``receive`` sets up the evaluation here of the ST
models that ``scripts/device_s2t.sh`` trained on another machine (docs/recipes.md). ``package``
makes an ST checkpoint a model folder that needs nothing else; ``show`` streams one over a test
set, printing each transcript beside its translation.
"""
import argparse
import itertools
import json
import shutil
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import soundfile
import yaml

from leapformer_fairseq.audio import SAMPLE_RATE
from leapformer_fairseq.recipes.common import (
    PLUGIN,
    ROOT,
    SHARDS_HELP,
    SIMULEVAL,
    Recipe,
    atomic_output,
    read_lines,
    read_recipe,
    write_text,
)
from leapformer_fairseq.recipes.config import (
    FRAMES_PER_UNIT,
    SHORTCUTS,
    WAITK,
    ConfigError,
    Run,
    TrainConfig,
    add_config_arguments,
    add_shortcuts,
    apply_shortcuts,
    config_from_arguments,
    load_checkpoint,
    load_config,
    recorded_options,
    resolve,
    run_label,
    train_run,
)
from leapformer_fairseq.recipes.mustc import (
    SPECAUGMENT_POLICIES,
    load_talk,
    read_split,
    write_config,
)
from leapformer_fairseq.recipes.tts import HELDOUT_SPLIT
from leapformer_fairseq.recipes.tts import MARKER as TTS_MARKER
from leapformer_fairseq.simuleval_scores import (
    plain_and_computation_aware_scores,
    write_scores_tsv,
)

AGENT = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
TRAIN_SHORTCUTS = (*SHORTCUTS, FRAMES_PER_UNIT)
DEMO_SHORTCUTS = (WAITK, FRAMES_PER_UNIT)
LATENCY_METRICS = ("AL", "LAAL", "AP", "DAL", "ATD")
TEST_SETS = {  # evaluation set -> what prepare cut into it; results go to OUT/<set>/
    "eval": "prepare's --eval-split (default)",
    "heldout": "prepare's --heldout-split",
}
# what scripts/device_s2t.sh hands back besides the st_<run>.pt checkpoints, and the settings of
# make_tts_corpus.py that decide the test audio (so both machines' test sets are the same audio)
DEVICE_FILES = ("data.tgz", TTS_MARKER)
TTS_SETTINGS = ("corpus", "src", "tgt", "per_talk", "voices", "heldout_voices", "speeds",
                "pause", "seed")
# a folder of package: the compact checkpoint, its record, and the files config_st.yaml names
MODEL_CHECKPOINT, MODEL_RECORD = "checkpoint.pt", "model.json"
MODEL_DATA = ("spm_st.model", "spm_st.txt", "gcmvn.npz")
# the training options model.json records (besides waitk, the k it streams at, and num_updates)
MODEL_OPTIONS = ("arch", "encoder_attn_type", "decoder_attn_type", "cross_attn_type",
                 "leap_feature_map", "waitk_lagging", "frames_per_unit")
SIDE_BY_SIDE_WIDTH = 44  # characters per column of show's transcripts and translations
TABLE_COLUMNS = ("BLEU", *[f"{m}{suffix}" for m in LATENCY_METRICS for suffix in ("", "_CA")])
RECIPE = Recipe("s2t")
log, run = RECIPE.log, RECIPE.run


# ---------------------------------------------------------------------------- prepare
def prepare(args) -> None:
    out = Path(args.out)
    if args.tests_only:
        prepare_tests(args, out)
        return
    run([sys.executable, ROOT / "scripts" / "prep_mustc.py", "--data-root", args.data_root,
         "--lang", args.lang, "--splits", ",".join([args.train_split, args.valid_split,
                                                    args.eval_split]),
         "--out", out, "--vocab-size-asr", args.vocab_size_asr,
         *(["--vocab-size-st", args.vocab_size_st] if args.vocab_size_st is not None else []),
         *(["--st-vocab-from", args.st_vocab_from] if args.st_vocab_from else []),
         *(["--specaugment", args.specaugment] if args.specaugment else []),
         *(["--resample"] if args.resample else [])], "prepare: prep_mustc")
    cut_eval_segments(Path(args.data_root), args.lang, args.eval_split, out, args.resample,
                      args.max_eval, "eval")
    if args.heldout_split:
        cut_eval_segments(Path(args.data_root), args.lang, args.heldout_split, out,
                          args.resample, args.max_eval, "heldout")
    write_text(out / "recipe.json", json.dumps({
        "lang": args.lang, "train": args.train_split, "valid": args.valid_split,
        "eval": args.eval_split, "heldout": args.heldout_split}) + "\n")
    log(f"prepare: done -> {out}")


def prepare_tests(args, out: Path) -> None:
    """``prepare --tests-only``: cut ``--eval-split`` (and ``--heldout-split``, if given) of
    ``--data-root`` into ``out``, an earlier prepare output, whose features, vocabularies,
    CMVN and fairseq manifests stay as they are (the models trained on them stay valid)."""
    recipe = read_recipe(out, "s2t", "prepare --tests-only")
    if recipe["lang"] != args.lang:
        raise RECIPE.fail(f"prepare --tests-only: --lang {args.lang}, but {out} was prepared "
                          f"for {recipe['lang']}")
    cut_eval_segments(Path(args.data_root), args.lang, args.eval_split, out, args.resample,
                      args.max_eval, "eval")
    if args.heldout_split:
        cut_eval_segments(Path(args.data_root), args.lang, args.heldout_split, out,
                          args.resample, args.max_eval, "heldout")
    write_text(out / "recipe.json", json.dumps(
        {**recipe, "eval": args.eval_split, "heldout": args.heldout_split or recipe["heldout"]})
        + "\n")
    log(f"prepare: test sets cut again -> {out}")


def cut_eval_segments(data_root: Path, lang: str, split: str, out: Path, resample: bool,
                      limit: int, test_set: str) -> None:
    """One 16 kHz wav per segment of ``split`` for SimulEval (``<test_set>_wavs/``), with the
    source list (``<test_set>.wav_list``), references (``<test_set>.<lang>``) and transcripts
    (``<test_set>.en``) in the same order; ``test_set`` is a key of ``TEST_SETS``."""
    root = data_root / f"en-{lang}"
    segments = read_split(root, split, lang)
    if limit:
        segments = segments[:limit]
    folder = out / f"{test_set}_wavs"
    folder.mkdir(parents=True, exist_ok=True)
    talks: Dict[str, object] = {}
    paths: List[str] = []
    for index, segment in enumerate(segments):
        talk = segment["wav"]
        if talk not in talks:
            talks = {talk: load_talk(root / "data" / split / "wav" / talk, resample)}
        start = round(float(segment["offset"]) * SAMPLE_RATE)
        samples = talks[talk][start:start + round(float(segment["duration"]) * SAMPLE_RATE)]
        path = folder / f"{Path(talk).stem}_{index}.wav"
        with atomic_output(path) as partial:
            soundfile.write(partial, samples, SAMPLE_RATE, subtype="PCM_16")
        paths.append(str(path.resolve()))
    write_text(out / f"{test_set}.wav_list", "".join(p + "\n" for p in paths))
    write_text(out / f"{test_set}.{lang}", "".join(s["tgt"] + "\n" for s in segments))
    write_text(out / f"{test_set}.en", "".join(s["en"] + "\n" for s in segments))
    log(f"prepare: {len(paths)} {split} segments -> {folder}")


# ------------------------------------------------------------------------------ train
def run_dir(data: Path, task: str, attn_type: str, waitk: Union[int, str, None]) -> Path:
    return data / "runs" / f"{task}_{run_label(attn_type, waitk)}"


def train(data: Path, task: str, config: TrainConfig,
          asr_checkpoint: Optional[Path] = None) -> Run:
    """fairseq-train of ``config`` on the ``task`` (``asr`` or ``st``) data of ``data`` into
    ``data/runs/<task>_<attention>_k<k>``; ST starts from the encoder of ``asr_checkpoint``,
    by default the ASR run of the same attention and k."""
    step = f"train-{task}"
    if not (data / f"config_{task}.yaml").is_file():
        raise RECIPE.fail(f"{step}: {data / f'config_{task}.yaml'} not found; run prepare first")
    recipe = read_recipe(data, "s2t", step)
    base = [data, "--user-dir", PLUGIN, "--task", "speech_to_text", "--config-yaml",
            f"config_{task}.yaml", "--train-subset", f"{recipe['train']}_{task}",
            "--valid-subset", f"{recipe['valid']}_{task}"]
    try:
        resolved = resolve(config, base)
        attn_type, waitk = resolved.attn_type, resolved.waitk
        if task == "st":
            asr = asr_checkpoint or run_dir(data, "asr", attn_type, waitk) / "checkpoint_last.pt"
            if not asr.is_file():
                raise RECIPE.fail(f"{step}: ASR checkpoint {asr} not found; run train-asr "
                                  f"--attn-type {attn_type} --waitk {waitk} or pass "
                                  "--asr-checkpoint")
            resolved = resolve(config, [*base, "--load-pretrained-encoder-from", asr])
    except ConfigError as error:
        raise RECIPE.fail(f"{step}: {error}") from None
    return train_run(RECIPE, step, resolved, run_dir(data, task, attn_type, waitk))


def train_command(args) -> None:
    task = args.command.removeprefix("train-")
    try:
        config = config_from_arguments(args, f"s2t {args.command}", TRAIN_SHORTCUTS)
    except ConfigError as error:
        raise RECIPE.fail(f"{args.command}: {error}") from None
    asr = getattr(args, "asr_checkpoint", None)
    train(Path(args.data), task, config, Path(asr) if asr else None)


# --------------------------------------------------------------------------- evaluate
def simuleval(data: Path, checkpoint: Path, output: Path, waitk: int, segment_ms: int,
              sentences: int, quiet: bool = False, extra: Sequence = (),
              test_set: str = "eval", shards: int = 1,
              model_data: Optional[Path] = None) -> Dict[str, float]:
    """SimulEval CLI with the speech agent and ``--computation-aware`` on ``test_set`` (a key
    of ``TEST_SETS``) of ``data``, ``shards`` SimulEval processes sharing the segments; the
    agent reads ``config_st.yaml`` and what it names from ``model_data`` (default ``data``).
    Returns BLEU and each latency metric plain and ``_CA`` (also written to
    ``output/scores_plain_ca.tsv``)."""
    recipe = read_recipe(data, "s2t", "evaluate")
    source, target = data / f"{test_set}.wav_list", data / f"{test_set}.{recipe['lang']}"
    for path in (source, target):
        if not path.is_file():
            raise RECIPE.fail(f"evaluate: missing {path}; run prepare first"
                              + (" with --heldout-split" if test_set == "heldout" else ""))
    output.mkdir(parents=True, exist_ok=True)
    source, target = RECIPE.first_lines([source, target], output, sentences)
    (output / "instances.log").unlink(missing_ok=True)  # SimulEval appends to it
    RECIPE.simuleval(
        [*SIMULEVAL, "--agent", AGENT, "--source", source, "--target", target,
         "--checkpoint", checkpoint, "--data-dir", model_data or data,
         "--config-yaml", "config_st.yaml",
         "--waitk", waitk, "--output", output, "--source-segment-size", segment_ms, *extra],
        ["--source-type", "speech", "--target-type", "text", "--quality-metrics", "BLEU",
         "--latency-metrics", *LATENCY_METRICS, "--eval-latency-unit", "word",
         "--computation-aware"],
        output, f"simuleval wait-{waitk} {checkpoint.parent.name}", quiet, shards)
    scores = plain_and_computation_aware_scores(output, LATENCY_METRICS, ("BLEU",), "word")
    with atomic_output(output / "scores_plain_ca.tsv") as partial:
        write_scores_tsv(scores, partial)
    return scores


def evaluate(args) -> None:
    data = Path(args.data)
    runs = RECIPE.evaluation_runs(
        args.attn_types, args.waitk,
        lambda attn_type, waitk: run_dir(data, "st", attn_type, waitk) / args.checkpoint_name,
        "train-st", args.multipath)

    def evaluate_run(spec: Tuple[str, int, Path]) -> Dict:
        name, waitk, checkpoint = spec
        scores = simuleval(data, checkpoint, data / args.test_set / f"{name}_k{waitk}", waitk,
                           args.segment_ms, args.sentences, quiet=args.jobs > 1,
                           test_set=args.test_set, shards=args.shards)
        log(f"evaluate: {args.test_set} {name} wait-{waitk}: "
            + "  ".join(f"{metric} {scores[metric]:.2f}" for metric in TABLE_COLUMNS))
        return {"attn_type": name, "waitk": waitk, **scores}

    rows = RECIPE.parallel(evaluate_run, runs, args.jobs)
    RECIPE.write_results(rows, TABLE_COLUMNS, data / args.test_set,
                         [("AL", "o-"), ("AL_CA", "s--")], "latency (ms)")


# ---------------------------------------------------------------------------- receive
def receive(args) -> None:
    """Evaluation data for the ST models scripts/device_s2t.sh trained elsewhere: its prepared
    files (``data.tgz``) with the data configs rewritten for ``--out``, the test sets cut from
    ``--data-root``, a local synthesis with the device's settings (checked against its
    ``tts_corpus.json``), and each ``st_<run>.pt`` as ``runs/st_<run>/checkpoint_last.pt``."""
    source, out, data_root = Path(args.from_dir), Path(args.out), Path(args.data_root)
    for name in DEVICE_FILES:
        if not (source / name).is_file():
            raise RECIPE.fail(f"receive: {source / name} not found; --from is the OUT folder "
                              "of scripts/device_s2t.sh")
    checkpoints = sorted(source.glob("st_*.pt"))
    if not checkpoints:
        raise RECIPE.fail(f"receive: no st_*.pt checkpoint in {source}")
    device = json.loads((source / TTS_MARKER).read_text())
    local_path = data_root / f"{device['src']}-{device['tgt']}" / TTS_MARKER
    if not local_path.is_file():
        raise RECIPE.fail(f"receive: {local_path} not found; synthesise the test sets here "
                          "first (make_tts_corpus.py --splits tst-COMMON,tst-HE with the "
                          f"device's settings, {source / TTS_MARKER})")
    local = json.loads(local_path.read_text())
    with tarfile.open(source / "data.tgz") as archive:
        recipe = json.load(archive.extractfile("recipe.json"))
    test_sets = {"eval": recipe["eval"], "heldout": recipe["heldout"]}
    for key in TTS_SETTINGS:
        if local.get(key) != device[key]:
            raise RECIPE.fail(f"receive: {local_path}: {key} is {local.get(key)!r}, the device "
                              f"synthesised with {device[key]!r}")
    for split in filter(None, test_sets.values()):
        pairs, expected = local["pairs"].get(split), device["pairs"][split]
        if pairs != expected:
            raise RECIPE.fail(f"receive: {local_path}: {split} has {pairs} pairs, the device's "
                              f"{expected} (make_tts_corpus.py --max-test)")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source / "data.tgz") as archive:
        archive.extractall(out, filter="data")
    for task in ("asr", "st"):  # the prepared configs name the device's paths
        write_config(out, task)
    for test_set, split in test_sets.items():
        if split:
            cut_eval_segments(data_root, recipe["lang"], split, out, False, 0, test_set)
    for checkpoint in checkpoints:
        run = out / "runs" / checkpoint.stem
        run.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, run / "checkpoint_last.pt")
        log(f"receive: {checkpoint} -> {run / 'checkpoint_last.pt'}")
    log(f"receive: done -> {out}; evaluate with: python scripts/s2t_recipe.py evaluate --data "
        f"{out} --attn-types ... --waitk ... --test-set eval (then heldout)")


# ---------------------------------------------------------------------------- package
def package(args) -> None:
    """``--checkpoint``, an ST run of ``--data``, as a model folder that needs nothing else: the
    checkpoint without optimizer state, in fp16 (:mod:`leapformer_fairseq.compact`), the files
    its data configuration names (SentencePiece model and vocabulary, CMVN) with a
    ``config_st.yaml`` naming them within the folder, and ``model.json`` (the k it streams at,
    ``--waitk``, one of a multi-path model's; the model's attention, trained k, unit size and
    updates) for ``show``."""
    data, checkpoint, out = Path(args.data), Path(args.checkpoint), Path(args.out)
    config_path = data / "config_st.yaml"
    for path, flag in ((config_path, "--data"), (checkpoint, "--checkpoint")):
        if not path.is_file():
            raise RECIPE.fail(f"package: {flag}: {path} not found")
    config = yaml.safe_load(config_path.read_text())
    try:
        named = {"spm_st.model": config["bpe_tokenizer"]["sentencepiece_model"],
                 "spm_st.txt": config["vocab_filename"],
                 "gcmvn.npz": config["global_cmvn"]["stats_npz_path"]}
    except (KeyError, TypeError) as error:
        raise RECIPE.fail(f"package: {config_path} names no {error} (not a prepare output)")
    sources = {name: data / path for name, path in named.items()}  # an absolute path stays
    for name, source in sources.items():
        if not source.is_file():
            raise RECIPE.fail(f"package: {source}, which {config_path} names, not found")
    try:
        state = load_checkpoint(checkpoint)
    except ConfigError as error:
        raise RECIPE.fail(f"package: --checkpoint {error}") from None
    options = recorded_options(state) or {}
    if options.get("config_yaml") != "config_st.yaml":
        raise RECIPE.fail(f"package: --checkpoint {checkpoint} is not a train-st run "
                          f"(trained with --config-yaml {options.get('config_yaml')})")
    from leapformer_fairseq.models.leapformer_transformer import waitk_lags

    trained = waitk_lags(options.get("waitk_lagging"))
    waitk = args.waitk if args.waitk is not None else trained[0]
    if (len(trained) > 1 and args.waitk is None) or waitk not in trained:
        raise RECIPE.fail(f"package: --checkpoint {checkpoint} was trained at wait-k "
                          f"{options.get('waitk_lagging')}; give --waitk K, one of "
                          f"{','.join(map(str, trained))}")
    import torch

    from leapformer_fairseq.compact import compact_state

    out.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        shutil.copyfile(source, out / name)
    write_config(out, "st", in_folder=True)
    with atomic_output(out / MODEL_CHECKPOINT) as partial:
        torch.save(compact_state(state, fp16=True), partial)
    record = {"waitk": waitk, **{name: options.get(name) for name in MODEL_OPTIONS}}
    record["num_updates"] = state["optimizer_history"][-1]["num_updates"]
    write_text(out / MODEL_RECORD, json.dumps(record, indent=1) + "\n")
    size = sum(path.stat().st_size for path in out.iterdir()) / 2**20
    log(f"package: {checkpoint} -> {out} ({size:.1f} MiB)")


def read_model(model: Path, flag: str) -> Dict:
    """The ``model.json`` of a ``package`` folder, after checking that the folder holds every
    file of one; a missing one stops the recipe naming it and ``flag``."""
    for name in (MODEL_CHECKPOINT, MODEL_RECORD, "config_st.yaml", *MODEL_DATA):
        if not (model / name).is_file():
            raise RECIPE.fail(f"{flag} {model}: missing {model / name}; make the folder with "
                              "s2t_recipe.py package")
    return json.loads((model / MODEL_RECORD).read_text())


def show_model(model: Path, data: Path, output: Path, test_set: str, utterances: int,
               segment_ms: int) -> Dict[str, float]:
    """Stream the ``package`` folder ``model`` over the first ``utterances`` (0: all) of
    ``test_set`` of ``data`` (SimulEval with ``--computation-aware``); print each transcript
    beside its streamed translation, then BLEU, AL and AL_CA, which it returns with the other
    scores."""
    record = read_model(model, "--model")
    transcripts = data / f"{test_set}.en"
    if not transcripts.is_file():
        raise RECIPE.fail(f"show: missing {transcripts}; run prepare again (it writes the "
                          "transcripts of each test set)")
    scores = simuleval(data, model / MODEL_CHECKPOINT, output, record["waitk"],
                       segment_ms, utterances, quiet=True, test_set=test_set, model_data=model)
    instances = [json.loads(line) for line in (output / "instances.log").open()]
    pairs = zip(read_lines(transcripts, "s2t"), (item["prediction"] for item in instances))
    print(f"\n{model_title(record)} ({model}), streamed over {len(instances)} utterances "
          f"({data / test_set}.wav_list):\n"
          + "\n".join(side_by_side([("transcript", "translation"), *pairs]))
          + f"\n  BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.0f} ms  "
          f"AL_CA {scores['AL_CA']:.0f} ms")
    return scores


def model_title(record: Dict) -> str:
    """``LeaP wait-5 on units of 9 encoder frames, 3,000 updates`` for a ``model.json``."""
    types = {record[f"{part}_attn_type"] for part in ("encoder", "decoder", "cross")}
    attention = "/".join(sorted(types)) if len(types) > 1 else types.pop()
    attention = {"leap": "LeaP"}.get(attention, attention)
    return (f"{attention} wait-{record['waitk']} on units of "
            f"{record['frames_per_unit']} encoder frames, {record['num_updates']:,} updates")


def side_by_side(rows: Sequence[Tuple[str, str]], width: int = SIDE_BY_SIDE_WIDTH) -> List[str]:
    """Two columns, each entry wrapped at ``width`` characters, the left one padded."""
    lines = []
    for left, right in rows:
        wrapped = itertools.zip_longest(textwrap.wrap(left, width) or [""],
                                        textwrap.wrap(right, width) or [""], fillvalue="")
        lines += [f"  {a:<{width}} | {b}" for a, b in wrapped]
    return lines


def show(args) -> None:
    data, model = Path(args.data), Path(args.model)
    read_recipe(data, "s2t", "show")
    show_model(model, data, Path(args.out) if args.out else data / args.test_set / "model",
               args.test_set, args.sentences, args.segment_ms)


# ------------------------------------------------------------------------------- demo
def demo(args) -> None:
    """Synthesise a slice of the built-in gettext-mt data, prepare it, train a tiny ASR and a
    tiny wait-k ST model (configs/s2t/demo_asr.yaml, demo_st.yaml: LeaP, CPU), evaluate with
    SimulEval on the test pairs in the training voices and in the held-out voices, and print
    BLEU, AL and AL_CA of each; with ``--model``, then stream that ``package`` folder over the
    held-out voices' test pairs (``show_model``)."""
    out = Path(args.out)
    if args.model:  # before the training, not after
        read_model(Path(args.model), "--model")
    corpus = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
    run([sys.executable, ROOT / "scripts" / "make_tts_corpus.py", "--corpus", corpus,
         "--src", "en", "--tgt", "de", "--out", out / "tts", "--max-train", args.train_pairs,
         "--max-valid", args.test_pairs, "--max-test", args.test_pairs], "demo: TTS")
    prepare(argparse.Namespace(
        data_root=str(out / "tts"), lang="de", out=str(out), train_split="train",
        valid_split="dev", eval_split="tst-COMMON", heldout_split=HELDOUT_SPLIT,
        vocab_size_asr=args.vocab_size, vocab_size_st=args.vocab_size, st_vocab_from=None,
        specaugment=None, resample=False, max_eval=0, tests_only=False))
    runs = {}
    for task, updates in (("asr", args.asr_updates), ("st", args.st_updates)):
        try:
            config = load_config(f"s2t/demo_{task}", f"s2t train-{task}")
            apply_shortcuts(config, args, DEMO_SHORTCUTS)
            config.set("max-update", updates, f"--{task}-updates {updates}")
        except ConfigError as error:
            raise RECIPE.fail(f"demo: {error}") from None
        runs[task] = train(out, task, config)
    st = runs["st"]
    lines = []
    for test_set, voices in (("eval", "training voices"), ("heldout", "held-out voices")):
        scores = simuleval(out, st.directory / "checkpoint_last.pt",
                           out / test_set / f"{st.attn_type}_k{st.waitk}", st.waitk,
                           args.segment_ms, 0, test_set=test_set)
        lines.append(f"  {voices}: BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.0f} ms  "
                     f"AL_CA {scores['AL_CA']:.0f} ms")
    print(f"\nSpeech demo ({st.attn_type} wait-{st.waitk}, ASR {args.asr_updates} + ST "
          f"{args.st_updates} updates, {args.test_pairs} test utterances):\n" + "\n".join(lines))
    if args.model:
        show_model(Path(args.model), out, out / "heldout" / "model", "heldout",
                   args.model_utterances, args.segment_ms)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="prep_mustc.py + evaluation wavs")
    p.add_argument("--data-root", required=True, help="MuST-C root (holding en-<lang>/)")
    p.add_argument("--lang", default="de")
    p.add_argument("--out", required=True)
    p.add_argument("--train-split", default="train")
    p.add_argument("--valid-split", default="dev")
    p.add_argument("--eval-split", default="tst-COMMON")
    p.add_argument("--heldout-split", help="a second evaluation split (e.g. tst-HE, "
                   "make_tts_corpus.py's held-out voices), for evaluate --test-set heldout")
    p.add_argument("--max-eval", type=int, default=0,
                   help="first N segments of each evaluation split")
    p.add_argument("--tests-only", action="store_true",
                   help="only cut the evaluation splits again into --out, an earlier prepare "
                        "output (its features, vocabularies and CMVN unchanged): e.g. a whole "
                        "test set synthesised after training")
    p.add_argument("--vocab-size-asr", type=int, default=5000)
    p.add_argument("--vocab-size-st", type=int, help="default 8000")
    p.add_argument("--st-vocab-from", metavar="T2T_DATA",
                   help="the translations' vocabulary of this t2t_recipe.py prepare output "
                        "(so train-st can take its decoder: --load-pretrained-decoder-from)")
    p.add_argument("--specaugment", choices=sorted(SPECAUGMENT_POLICIES),
                   help="SpecAugment policy of the train split (prep_mustc.py; default none)")
    p.add_argument("--resample", action="store_true",
                   help="resample / down-mix audio that is not 16 kHz mono")
    p.set_defaults(run=prepare)

    for task, default, help in (("asr", "s2t/asr_small", "ASR pre-training of the encoder"),
                                ("st", "s2t/st_small", "wait-k ST from the ASR encoder")):
        p = commands.add_parser(f"train-{task}", help=help)
        p.add_argument("--data", required=True, help="the prepare --out directory")
        add_config_arguments(p, default, TRAIN_SHORTCUTS)
        if task == "st":
            p.add_argument("--asr-checkpoint", help="default: the train-asr run of the same "
                                                    "attention and wait-k")
        p.set_defaults(run=train_command)

    p = commands.add_parser("evaluate", help="SimulEval, plain and computation-aware latency")
    p.add_argument("--data", required=True)
    p.add_argument("--attn-types", default="leap,softmax")
    p.add_argument("--waitk", default="5", help="k values, comma-separated (default 5)")
    p.add_argument("--multipath", metavar="SET",
                   help="evaluate the multi-path ST runs trained with --waitk SET (e.g. 1-9) at "
                        "each --waitk k, into eval/<attention>_k<SET>_k<k>")
    p.add_argument("--segment-ms", type=int, default=200,
                   help="SimulEval --source-segment-size: audio per agent call")
    p.add_argument("--test-set", choices=TEST_SETS, default="eval",
                   help="; ".join(f"{name}: {what}" for name, what in TEST_SETS.items()))
    p.add_argument("--sentences", type=int, default=0, help="first N segments (0: all)")
    p.add_argument("--checkpoint-name", default="checkpoint_last.pt")
    p.add_argument("--jobs", type=int, default=1, help="SimulEval runs in parallel")
    p.add_argument("--shards", type=int, default=1, help=SHARDS_HELP)
    p.set_defaults(run=evaluate)

    p = commands.add_parser("receive", help="evaluation data for the models device_s2t.sh "
                            "trained on another machine")
    p.add_argument("--from", dest="from_dir", required=True,
                   help="device_s2t.sh's OUT: data.tgz, tts_corpus.json, st_<run>.pt")
    p.add_argument("--data-root", required=True,
                   help="make_tts_corpus.py --out of a synthesis here with the device's settings "
                        "(at least --splits tst-COMMON,tst-HE)")
    p.add_argument("--out", required=True, help="the data folder evaluate --data reads")
    p.set_defaults(run=receive)

    p = commands.add_parser("demo", help="TTS slice -> prepare -> tiny ASR -> tiny ST -> eval")
    p.add_argument("--out", default=str(ROOT / "work" / "demo-s2t"))
    p.add_argument("--train-pairs", type=int, default=600)
    p.add_argument("--test-pairs", type=int, default=40)
    p.add_argument("--vocab-size", type=int, default=1000)
    add_shortcuts(p, DEMO_SHORTCUTS)  # default: the demo configurations' (3, 4)
    p.add_argument("--asr-updates", type=int, default=150)
    p.add_argument("--st-updates", type=int, default=150)
    p.add_argument("--segment-ms", type=int, default=200)
    p.add_argument("--model", help="a package folder to stream over the held-out voices' test "
                   "pairs after the training run")
    p.add_argument("--model-utterances", type=int, default=0,
                   help="--model streams the first N test pairs (0: all --test-pairs)")
    p.set_defaults(run=demo)

    p = commands.add_parser("package", help="an ST checkpoint as a model folder that needs "
                            "nothing else (fp16, its SentencePiece model, vocabulary and CMVN)")
    p.add_argument("--data", required=True, help="the prepare --out directory it trained on")
    p.add_argument("--checkpoint", required=True, help="a train-st checkpoint")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--waitk", type=int, help="the k it streams at: one of a multi-path "
                   "model's (required there); a single-k model's own k by default")
    p.set_defaults(run=package)

    p = commands.add_parser("show", help="stream a package folder over a test set, printing "
                            "each transcript beside its translation")
    p.add_argument("--model", required=True, help="a package folder")
    p.add_argument("--data", required=True, help="a prepare --out directory (its test sets)")
    p.add_argument("--test-set", choices=TEST_SETS, default="heldout",
                   help="; ".join(f"{name}: {what}" for name, what in TEST_SETS.items()))
    p.add_argument("--sentences", type=int, default=0, help="first N segments (0: all)")
    p.add_argument("--segment-ms", type=int, default=200)
    p.add_argument("--out", help="SimulEval's output (default DATA/<test set>/model)")
    p.set_defaults(run=show)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
