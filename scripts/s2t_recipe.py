"""Simultaneous speech-to-text recipe: prepare -> ASR pre-training -> wait-k ST -> SimulEval.

    python scripts/s2t_recipe.py prepare --data-root MUSTC_ROOT --lang de --out work/s2t-en-de
    python scripts/s2t_recipe.py train-asr --data work/s2t-en-de --attn-type leap --waitk 5
    python scripts/s2t_recipe.py train-st --data work/s2t-en-de --attn-type leap --waitk 5
    python scripts/s2t_recipe.py evaluate --data work/s2t-en-de --attn-types leap,softmax --waitk 5
    python scripts/s2t_recipe.py demo      # TTS slice -> all of the above, tiny models (make demo)

``prepare`` runs ``scripts/prep_mustc.py`` (the real MuST-C layout, or the output of
``scripts/make_tts_corpus.py``) and cuts the evaluation split's segments into wav files for
SimulEval. ``train-asr`` pre-trains a ``leapformer_s2t_waitk`` model on the English transcripts;
``train-st`` trains the wait-k ST model with its encoder initialised from that ASR model
(``--load-pretrained-encoder-from``). ``evaluate`` runs the ``simuleval`` CLI with the speech
agent and ``--computation-aware``, then re-scores each run's instances.log with SimulEval's own
scorers for plain and computation-aware latency side by side
(:mod:`leapformer_fairseq.simuleval_scores`; SimulEval 1.1.4's ``--computation-aware`` makes its
plain columns computation-aware too).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import soundfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prep_mustc import load_talk, read_split  # noqa: E402  (the sibling script)
from recipe_common import (  # noqa: E402
    Recipe,
    atomic_output,
    read_lines,
    read_recipe,
    write_text,
)

from leapformer_fairseq.audio import SAMPLE_RATE  # noqa: E402
from leapformer_fairseq.simuleval_scores import (  # noqa: E402
    plain_and_computation_aware_scores,
    write_scores_tsv,
)

PLUGIN = ROOT / "leapformer_fairseq"
AGENT = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]
SIMULEVAL = [sys.executable, "-m", "simuleval.cli"]
LATENCY_METRICS = ("AL", "LAAL", "AP", "DAL", "ATD")
TABLE_COLUMNS = ("BLEU", *[f"{m}{suffix}" for m in LATENCY_METRICS for suffix in ("", "_CA")])
RECIPE = Recipe("s2t")
log, run = RECIPE.log, RECIPE.run


# ---------------------------------------------------------------------------- prepare
def prepare(args) -> None:
    out = Path(args.out)
    run([sys.executable, ROOT / "scripts" / "prep_mustc.py", "--data-root", args.data_root,
         "--lang", args.lang, "--splits", ",".join([args.train_split, args.valid_split,
                                                    args.eval_split]),
         "--out", out, "--vocab-size-asr", args.vocab_size_asr, "--vocab-size-st",
         args.vocab_size_st, *(["--resample"] if args.resample else [])], "prepare: prep_mustc")
    cut_eval_segments(Path(args.data_root), args.lang, args.eval_split, out, args.resample,
                      args.max_eval)
    write_text(out / "recipe.json", json.dumps({
        "lang": args.lang, "train": args.train_split, "valid": args.valid_split,
        "eval": args.eval_split}) + "\n")
    log(f"prepare: done -> {out}")


def cut_eval_segments(data_root: Path, lang: str, split: str, out: Path, resample: bool,
                      limit: int) -> None:
    """One 16 kHz wav per segment of ``split`` for SimulEval, with the source list
    (``eval.wav_list``) and references (``eval.<lang>``) in the same order."""
    root = data_root / f"en-{lang}"
    segments = read_split(root, split, lang)
    if limit:
        segments = segments[:limit]
    folder = out / "eval_wavs"
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
    write_text(out / "eval.wav_list", "".join(p + "\n" for p in paths))
    write_text(out / f"eval.{lang}", "".join(s["tgt"] + "\n" for s in segments))
    log(f"prepare: {len(paths)} {split} segments -> {folder}")


# ------------------------------------------------------------------------------ train
def run_dir(data: Path, task: str, attn_type: str, waitk: int) -> Path:
    return data / "runs" / f"{task}_{attn_type}_k{waitk}"


def train_command(args, task: str, save: Path, extra: Sequence = ()) -> List:
    data = Path(args.data)
    if not (data / f"config_{task}.yaml").is_file():
        raise SystemExit(f"[s2t] train-{task}: {data / f'config_{task}.yaml'} not found; "
                         "run prepare first")
    recipe = read_recipe(data, "s2t", f"train-{task}")
    return [*FAIRSEQ_TRAIN, data, "--user-dir", PLUGIN, "--task", "speech_to_text",
            "--config-yaml", f"config_{task}.yaml", "--train-subset",
            f"{recipe['train']}_{task}", "--valid-subset", f"{recipe['valid']}_{task}",
            "--arch", args.arch, "--waitk-lagging", args.waitk, "--fixed-pre-decision-ratio",
            args.pre_decision_ratio, "--encoder-attn-type", args.attn_type,
            "--decoder-attn-type", args.attn_type, "--cross-attn-type", args.attn_type,
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--report-accuracy", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
            "--clip-norm", "10.0", "--lr", args.lr, "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", args.warmup, "--max-tokens", args.max_tokens,
            "--max-update", args.max_update, "--save-dir", save, "--no-epoch-checkpoints",
            "--save-interval-updates", args.max_update, "--keep-interval-updates", "1",
            "--seed", args.seed, "--log-format", "simple", "--log-interval", "10",
            "--num-workers", "0", "--required-batch-size-multiple", "1",
            "--skip-invalid-size-inputs-valid-test",
            *(["--cpu"] if args.cpu else []), *extra,
            *args.fairseq_args]


def train_asr(args) -> None:
    save = run_dir(Path(args.data), "asr", args.attn_type, args.waitk)
    save.mkdir(parents=True, exist_ok=True)
    RECIPE.train(train_command(args, "asr", save), f"train-asr {args.attn_type}",
                 save / "train.log")
    log(f"train-asr: checkpoints in {save}")


def train_st(args) -> None:
    data = Path(args.data)
    asr = Path(args.asr_checkpoint) if args.asr_checkpoint else \
        run_dir(data, "asr", args.attn_type, args.waitk) / "checkpoint_last.pt"
    if not asr.is_file():
        raise SystemExit(f"[s2t] train-st: ASR checkpoint {asr} not found; run train-asr "
                         f"--attn-type {args.attn_type} --waitk {args.waitk} or pass "
                         "--asr-checkpoint")
    save = run_dir(data, "st", args.attn_type, args.waitk)
    save.mkdir(parents=True, exist_ok=True)
    RECIPE.train(train_command(args, "st", save, ["--load-pretrained-encoder-from", asr]),
                 f"train-st {args.attn_type} wait-{args.waitk}", save / "train.log")
    log(f"train-st: checkpoints in {save}")


# --------------------------------------------------------------------------- evaluate
def simuleval(data: Path, checkpoint: Path, output: Path, waitk: int, segment_ms: int,
              sentences: int, quiet: bool = False, extra: Sequence = ()) -> Dict[str, float]:
    """SimulEval CLI with the speech agent and ``--computation-aware``; returns BLEU and each
    latency metric plain and ``_CA`` (also written to ``output/scores_plain_ca.tsv``)."""
    recipe = read_recipe(data, "s2t", "evaluate")
    source, target = data / "eval.wav_list", data / f"eval.{recipe['lang']}"
    for path in (source, target):
        if not path.is_file():
            raise SystemExit(f"[s2t] evaluate: missing {path}; run prepare first")
    output.mkdir(parents=True, exist_ok=True)
    if sentences:
        for path, name in ((source, "source.txt"), (target, "target.txt")):
            lines = read_lines(path, "s2t")[:sentences]
            write_text(output / name, "".join(line + "\n" for line in lines))
        source, target = output / "source.txt", output / "target.txt"
    (output / "instances.log").unlink(missing_ok=True)  # SimulEval appends to it
    RECIPE.simuleval(
        [*SIMULEVAL, "--agent", AGENT, "--source", source, "--target", target,
         "--checkpoint", checkpoint, "--data-dir", data, "--config-yaml", "config_st.yaml",
         "--waitk", waitk, "--output", output, "--source-segment-size", segment_ms, *extra],
        ["--source-type", "speech", "--target-type", "text", "--quality-metrics", "BLEU",
         "--latency-metrics", *LATENCY_METRICS, "--eval-latency-unit", "word",
         "--computation-aware"],
        output, f"simuleval wait-{waitk} {checkpoint.parent.name}", quiet)
    scores = plain_and_computation_aware_scores(output, LATENCY_METRICS, ("BLEU",), "word")
    with atomic_output(output / "scores_plain_ca.tsv") as partial:
        write_scores_tsv(scores, partial)
    return scores


def evaluate(args) -> None:
    data = Path(args.data)
    runs: List[Tuple[str, int, Path]] = []
    for attn_type in args.attn_types.split(","):
        for waitk in (int(k) for k in args.waitk.split(",")):
            checkpoint = run_dir(data, "st", attn_type, waitk) / args.checkpoint_name
            if not checkpoint.is_file():
                raise SystemExit(f"[s2t] evaluate: missing {checkpoint}; run train-st "
                                 f"--attn-type {attn_type} --waitk {waitk} first")
            runs.append((attn_type, waitk, checkpoint))

    def evaluate_run(spec: Tuple[str, int, Path]) -> Dict:
        attn_type, waitk, checkpoint = spec
        scores = simuleval(data, checkpoint, data / "eval" / f"{attn_type}_k{waitk}", waitk,
                           args.segment_ms, args.sentences, quiet=args.jobs > 1)
        log(f"evaluate: {attn_type} wait-{waitk}: "
            + "  ".join(f"{name} {scores[name]:.2f}" for name in TABLE_COLUMNS))
        return {"attn_type": attn_type, "waitk": waitk, **scores}

    rows = RECIPE.parallel(evaluate_run, runs, args.jobs)
    RECIPE.write_results(rows, TABLE_COLUMNS, data / "eval", [("AL", "o-"), ("AL_CA", "s--")],
                         "latency (ms)")


# ------------------------------------------------------------------------------- demo
def demo(args) -> None:
    """Synthesise a slice of the built-in gettext-mt data, prepare it, train a tiny ASR and a
    tiny wait-k ST model (LeaP), evaluate with SimulEval and print BLEU, AL and AL_CA."""
    out = Path(args.out)
    corpus = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
    run([sys.executable, ROOT / "scripts" / "make_tts_corpus.py", "--corpus", corpus,
         "--src", "en", "--tgt", "de", "--out", out / "tts", "--max-train", args.train_pairs,
         "--max-valid", args.test_pairs, "--max-test", args.test_pairs], "demo: TTS")
    prepare(argparse.Namespace(
        data_root=str(out / "tts"), lang="de", out=str(out), train_split="train",
        valid_split="dev", eval_split="tst-COMMON", vocab_size_asr=args.vocab_size,
        vocab_size_st=args.vocab_size, resample=False, max_eval=0))
    options = dict(data=str(out), attn_type="leap", waitk=args.waitk,
                   arch="leapformer_s2t_waitk_tiny", pre_decision_ratio=args.pre_decision_ratio,
                   lr=2e-3, warmup=100, max_tokens=20000, seed=1, cpu=True, fairseq_args=[])
    train_asr(argparse.Namespace(**options, max_update=args.asr_updates))
    train_st(argparse.Namespace(**options, max_update=args.st_updates, asr_checkpoint=None))
    scores = simuleval(out, run_dir(out, "st", "leap", args.waitk) / "checkpoint_last.pt",
                       out / "eval" / f"leap_k{args.waitk}", args.waitk, args.segment_ms, 0)
    print(f"\nSpeech demo (LeaP wait-{args.waitk}, ASR {args.asr_updates} + ST "
          f"{args.st_updates} updates, {args.test_pairs} test utterances): "
          f"BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.0f} ms  AL_CA {scores['AL_CA']:.0f} ms")


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the prepare --out directory")
    p.add_argument("--attn-type", default="leap",
                   choices=["leap", "cosformer", "linear", "softmax"])
    p.add_argument("--waitk", type=int, default=5, help="wait-k lagging in source units")
    p.add_argument("--pre-decision-ratio", type=int, default=9,
                   help="encoder frames (40 ms) per source unit")
    p.add_argument("--arch", default="leapformer_s2t_waitk_small")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=20000, help="feature frames per batch")
    p.add_argument("--max-update", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="train on the CPU")
    p.add_argument("fairseq_args", nargs="*", help="more fairseq-train options, after --")


def main() -> None:
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
    p.add_argument("--max-eval", type=int, default=0, help="first N evaluation segments")
    p.add_argument("--vocab-size-asr", type=int, default=5000)
    p.add_argument("--vocab-size-st", type=int, default=8000)
    p.add_argument("--resample", action="store_true",
                   help="resample / down-mix audio that is not 16 kHz mono")
    p.set_defaults(run=prepare)

    p = commands.add_parser("train-asr", help="ASR pre-training of the encoder")
    add_training_args(p)
    p.set_defaults(run=train_asr)

    p = commands.add_parser("train-st", help="wait-k ST from the ASR encoder")
    add_training_args(p)
    p.add_argument("--asr-checkpoint", help="default: the train-asr run of the same "
                                            "--attn-type and --waitk")
    p.set_defaults(run=train_st)

    p = commands.add_parser("evaluate", help="SimulEval, plain and computation-aware latency")
    p.add_argument("--data", required=True)
    p.add_argument("--attn-types", default="leap,softmax")
    p.add_argument("--waitk", default="5")
    p.add_argument("--segment-ms", type=int, default=200,
                   help="SimulEval --source-segment-size: audio per agent call")
    p.add_argument("--sentences", type=int, default=0, help="first N segments (0: all)")
    p.add_argument("--checkpoint-name", default="checkpoint_last.pt")
    p.add_argument("--jobs", type=int, default=1, help="SimulEval runs in parallel")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("demo", help="TTS slice -> prepare -> tiny ASR -> tiny ST -> eval")
    p.add_argument("--out", default=str(ROOT / "work" / "demo-s2t"))
    p.add_argument("--train-pairs", type=int, default=600)
    p.add_argument("--test-pairs", type=int, default=40)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--waitk", type=int, default=3)
    p.add_argument("--pre-decision-ratio", type=int, default=4)
    p.add_argument("--asr-updates", type=int, default=150)
    p.add_argument("--st-updates", type=int, default=150)
    p.add_argument("--segment-ms", type=int, default=200)
    p.set_defaults(run=demo)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
