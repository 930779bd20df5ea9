"""Simultaneous text-to-text recipe: prepare -> train -> evaluate with SimulEval.

    python scripts/t2t_recipe.py prepare --corpus data/gettext-mt-full/en-de.{split}.tsv \
        --src en --tgt de --out work/en-de
    python scripts/t2t_recipe.py train --data work/en-de --attn-type leap --waitk 3
    python scripts/t2t_recipe.py evaluate --data work/en-de --attn-types leap,softmax --waitk 3,5
    python scripts/t2t_recipe.py demo          # all three on the built-in slice (make demo)

Corpora: the gettext-mt TSV layout (``domain<TAB>src<TAB>tgt`` with a header line), given as a
pattern with ``{split}``, or plain parallel files ``PREFIX.{split}.SRC`` / ``PREFIX.{split}.TGT``
via ``--plain-prefix``. Every step logs what it runs; failures name the step and file.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from recipe_common import (  # noqa: E402  (the sibling module)
    Recipe,
    read_lines,
    read_recipe,
    refuse_empty,
    train_sentencepiece,
    write_text,
)

RECIPE = Recipe("t2t")
log, run = RECIPE.log, RECIPE.run
# The tools run as modules of this interpreter, so the recipe works wherever the packages import
# (a venv, PYTHONPATH), with or without their console scripts on PATH.
FAIRSEQ_PREPROCESS = [sys.executable, "-m", "fairseq_cli.preprocess"]
FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]
SIMULEVAL = [sys.executable, "-m", "simuleval.cli"]
PLUGIN = ROOT / "leapformer_fairseq"
AGENT = ROOT / "simuleval_agents" / "leap_waitk_text_agent.py"
SPLITS = ("train", "valid", "test")
LATENCY_METRICS = ("AL", "LAAL", "AP", "DAL")


# ---------------------------------------------------------------------------- prepare
def read_pairs(args, split: str) -> List[Tuple[str, str]]:
    """(source, target) pairs of one split; a missing file, a wrong header or field count, an
    empty side or non-UTF-8 text stops the recipe naming the file (and line)."""
    if args.plain_prefix:
        src_path = Path(f"{args.plain_prefix}.{split}.{args.src}")
        tgt_path = Path(f"{args.plain_prefix}.{split}.{args.tgt}")
        for path in (src_path, tgt_path):
            if not path.is_file():
                raise SystemExit(f"[t2t] prepare: missing {path} (--plain-prefix)")
        sources, targets = read_lines(src_path, "t2t"), read_lines(tgt_path, "t2t")
        if len(sources) != len(targets):
            raise SystemExit(f"[t2t] prepare: {src_path} has {len(sources)} lines, "
                             f"{tgt_path} has {len(targets)}")
        refuse_empty(sources, src_path, "source line", "t2t")
        refuse_empty(targets, tgt_path, "target line", "t2t")
        return [(source.strip(), target.strip()) for source, target in zip(sources, targets)]
    path = Path(args.corpus.format(split=split))
    if not path.is_file():
        raise SystemExit(f"[t2t] prepare: missing {path} (--corpus with {{split}})")
    lines = read_lines(path, "t2t")
    header = lines[0].split("\t") if lines else []
    if header[1:] != [args.src, args.tgt]:
        raise SystemExit(f"[t2t] prepare: {path} header is {header}, expected "
                         f"['domain', '{args.src}', '{args.tgt}']")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise SystemExit(f"[t2t] prepare: {path}:{number} has {len(fields)} fields, not 3")
        pairs.append((fields[1].strip(), fields[2].strip()))
    refuse_empty([source for source, _ in pairs], path, f"source field ({args.src})", "t2t", 2)
    refuse_empty([target for _, target in pairs], path, f"target field ({args.tgt})", "t2t", 2)
    return pairs


def prepare(args) -> None:
    import sentencepiece

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {split: read_pairs(args, split) for split in SPLITS}
    for split in SPLITS:
        limit = getattr(args, f"max_{split}")
        if limit:
            pairs[split] = pairs[split][:limit]
        log(f"prepare: {split}: {len(pairs[split])} pairs")
        for side, index in ((args.src, 0), (args.tgt, 1)):
            write_text(out / f"{split}.{side}", "".join(pair[index] + "\n"
                                                        for pair in pairs[split]))
    log(f"prepare: SentencePiece unigram, joint {args.src}+{args.tgt}, "
        f"vocabulary {args.vocab_size}")
    train_sentencepiece(
        out / "spm", input=[str(out / f"train.{args.src}"), str(out / f"train.{args.tgt}")],
        vocab_size=args.vocab_size, model_type="unigram", character_coverage=1.0, bos_id=-1,
        eos_id=-1, unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    spm = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in SPLITS:
        for side, index in ((args.src, 0), (args.tgt, 1)):
            write_text(out / f"{split}.spm.{side}", "".join(
                " ".join(spm.encode(pair[index], out_type=str)) + "\n" for pair in pairs[split]))
    partial = out / ".data-bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run([*FAIRSEQ_PREPROCESS, "--source-lang", args.src, "--target-lang", args.tgt,
         "--trainpref", out / "train.spm", "--validpref", out / "valid.spm",
         "--testpref", out / "test.spm", "--destdir", partial, "--joined-dictionary",
         "--workers", "2"], "prepare: fairseq-preprocess")
    shutil.rmtree(out / "data-bin", ignore_errors=True)
    os.replace(partial, out / "data-bin")
    write_text(out / "recipe.json", json.dumps({"src": args.src, "tgt": args.tgt}) + "\n")
    log(f"prepare: done -> {out}")


# ------------------------------------------------------------------------------ train
def run_dir(data: Path, attn_type: str, waitk: int) -> Path:
    return data / "runs" / f"{attn_type}_k{waitk}"


def train(args) -> None:
    data = Path(args.data)
    if not (data / "data-bin").is_dir():
        raise SystemExit(f"[t2t] train: {data / 'data-bin'} not found; run prepare first")
    save = run_dir(data, args.attn_type, args.waitk)
    save.mkdir(parents=True, exist_ok=True)
    RECIPE.train([*FAIRSEQ_TRAIN, data / "data-bin", "--user-dir", PLUGIN,
         "--task", "translation", "--arch", args.arch, "--waitk-lagging", args.waitk,
         "--encoder-attn-type", args.attn_type, "--decoder-attn-type", args.attn_type,
         "--cross-attn-type", args.attn_type, "--share-all-embeddings",
         "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
         "--lr", args.lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", args.warmup,
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--dropout", "0.1", "--max-tokens", args.max_tokens, "--max-update", args.max_update,
         "--save-dir", save, "--no-epoch-checkpoints", "--save-interval-updates",
         args.max_update, "--keep-interval-updates", "1", "--seed", args.seed,
         "--log-format", "simple", "--log-interval", "20", "--num-workers", "0",
         "--skip-invalid-size-inputs-valid-test",
         *(["--cpu"] if args.cpu else ["--fp16"] if args.fp16 else []), *args.fairseq_args],
        f"train {args.attn_type} wait-{args.waitk}", save / "train.log")
    log(f"train: checkpoints in {save}")


# --------------------------------------------------------------------------- evaluate
def simuleval(data: Path, checkpoint: Path, output: Path, waitk: int, sentences: int,
              extra: Sequence[str] = (), quiet: bool = False) -> Dict[str, float]:
    """SimulEval CLI with the agent on the test set (or its first ``sentences``) into ``output``,
    then SimulEval's scoring; ``quiet`` sends its output to ``output/simuleval.log`` instead of
    the terminal."""
    recipe = read_recipe(data, "t2t", "evaluate")
    source, target = data / f"test.{recipe['src']}", data / f"test.{recipe['tgt']}"
    for path in (source, target, data / "data-bin", data / "spm.model"):
        if not path.exists():
            raise SystemExit(f"[t2t] evaluate: missing {path}; run prepare first")
    output.mkdir(parents=True, exist_ok=True)
    if sentences:
        for path, name in ((source, "source.txt"), (target, "target.txt")):
            lines = read_lines(path, "t2t")[:sentences]
            write_text(output / name, "".join(line + "\n" for line in lines))
        source, target = output / "source.txt", output / "target.txt"
    return RECIPE.simuleval(
        [*SIMULEVAL, "--agent", AGENT, "--source", source, "--target", target,
         "--checkpoint", checkpoint, "--data-bin", data / "data-bin", "--spm",
         data / "spm.model", "--waitk", waitk, "--output", output, *extra],
        ["--source-type", "text", "--target-type", "text", "--quality-metrics", "BLEU",
         "--latency-metrics", *LATENCY_METRICS, "--eval-latency-unit", "word"],
        output, f"simuleval wait-{waitk} {checkpoint.parent.name}", quiet)


def evaluate(args) -> None:
    data = Path(args.data)
    runs = []
    for attn_type in args.attn_types.split(","):
        for waitk in (int(k) for k in args.waitk.split(",")):
            checkpoint = run_dir(data, attn_type, waitk) / args.checkpoint_name
            if not checkpoint.is_file():
                raise SystemExit(f"[t2t] evaluate: missing {checkpoint}; run train "
                                 f"--attn-type {attn_type} --waitk {waitk} first")
            runs.append((attn_type, waitk, checkpoint))

    def evaluate_run(run_spec: Tuple[str, int, Path]) -> Dict:
        attn_type, waitk, checkpoint = run_spec
        output = data / "eval" / f"{attn_type}_k{waitk}"
        scores = simuleval(data, checkpoint, output, waitk, args.sentences,
                           quiet=args.jobs > 1)
        log(f"evaluate: {attn_type} wait-{waitk}: " + "  ".join(
            f"{name} {value:.2f}" for name, value in scores.items()))
        return {"attn_type": attn_type, "waitk": waitk, **scores}

    rows = RECIPE.parallel(evaluate_run, runs, args.jobs)
    RECIPE.write_results(rows, ["BLEU", *LATENCY_METRICS], data / "eval", [("AL", "o-")],
                         "AL (words)")


# ------------------------------------------------------------------------------- demo
def demo(args) -> None:
    out = Path(args.out)
    corpus = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
    prepare(argparse.Namespace(corpus=str(corpus), plain_prefix=None, src="en", tgt="de",
                               out=str(out), vocab_size=args.vocab_size, max_train=0,
                               max_valid=0, max_test=args.sentences))
    train(argparse.Namespace(
        data=str(out), attn_type="leap", waitk=3, arch="leapformer_waitk_transformer_small",
        lr=2e-3, warmup=100, max_tokens=4096, max_update=args.max_update, seed=1, cpu=True,
        fp16=False, fairseq_args=[]))
    scores = simuleval(out, run_dir(out, "leap", 3) / "checkpoint_last.pt",
                       out / "eval" / "leap_k3", 3, args.sentences)
    print(f"\nDemo (LeaP wait-3, {args.max_update} updates, {args.sentences} test sentences): "
          f"BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.2f}  LAAL {scores['LAAL']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="SentencePiece + fairseq-preprocess")
    p.add_argument("--corpus", help="gettext-mt TSV path with {split}, e.g. en-de.{split}.tsv")
    p.add_argument("--plain-prefix", help="plain files PREFIX.{train,valid,test}.{src,tgt}")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4000)
    for split in SPLITS:
        p.add_argument(f"--max-{split}", type=int, default=0, help="keep the first N pairs")
    p.set_defaults(run=prepare)

    p = commands.add_parser("train", help="fairseq-train a wait-k model")
    p.add_argument("--data", required=True, help="the prepare --out directory")
    p.add_argument("--attn-type", default="leap", choices=["leap", "cosformer", "linear",
                                                            "softmax"])
    p.add_argument("--waitk", type=int, default=3)
    p.add_argument("--arch", default="leapformer_waitk_transformer_small")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--max-update", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="train on the CPU")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("fairseq_args", nargs="*", help="more fairseq-train options, after --")
    p.set_defaults(run=train)

    p = commands.add_parser("evaluate", help="SimulEval for attention types x k values")
    p.add_argument("--data", required=True)
    p.add_argument("--attn-types", default="leap,softmax")
    p.add_argument("--waitk", default="3,5")
    p.add_argument("--sentences", type=int, default=0, help="first N test sentences (0: all)")
    p.add_argument("--checkpoint-name", default="checkpoint_last.pt",
                   help="checkpoint file in each run directory")
    p.add_argument("--jobs", type=int, default=1,
                   help="SimulEval runs in parallel (each logs to its eval dir's simuleval.log)")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("demo", help="prepare + train + evaluate on the built-in slice")
    p.add_argument("--out", default=str(ROOT / "work" / "demo"))
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--sentences", type=int, default=100)
    p.set_defaults(run=demo)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
