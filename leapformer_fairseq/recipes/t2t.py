"""Simultaneous text-to-text recipe: prepare -> train -> evaluate with SimulEval.

    python scripts/t2t_recipe.py prepare --corpus data/gettext-mt-full/en-de.{split}.tsv \
        --src en --tgt de --out work/en-de
    python scripts/t2t_recipe.py train --data work/en-de --config t2t/small --waitk 5
    python scripts/t2t_recipe.py evaluate --data work/en-de --attn-types leap,softmax --waitk 3,5
    python scripts/t2t_recipe.py distill --data work/en-de --out work/en-de-kd \
        --teacher work/en-de/runs/softmax_offline/checkpoint_last.pt
    python scripts/t2t_recipe.py demo          # all three on the built-in slice (make demo)

Corpora: the gettext-mt TSV layout (``domain<TAB>src<TAB>tgt`` with a header line), given as a
pattern with ``{split}``, or plain parallel files ``PREFIX.{split}.SRC`` / ``PREFIX.{split}.TGT``
via ``--plain-prefix``. ``train`` reads a configuration (``configs/t2t/*.yaml``,
docs/recipes.md), overridden by its flags. Every step logs what it runs; failures name the step
and file.
"""
import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from leapformer_fairseq.recipes.common import (
    FAIRSEQ_GENERATE,
    FAIRSEQ_PREPROCESS,
    PLUGIN,
    ROOT,
    SHARDS_HELP,
    SIMULEVAL,
    Recipe,
    read_lines,
    read_recipe,
    read_tsv_pairs,
    refuse_empty,
    train_sentencepiece,
    write_text,
)
from leapformer_fairseq.recipes.config import (
    ConfigError,
    Run,
    TrainConfig,
    add_config_arguments,
    config_from_arguments,
    load_config,
    resolve,
    run_label,
    train_run,
)

RECIPE = Recipe("t2t")
log, run = RECIPE.log, RECIPE.run
AGENT = ROOT / "simuleval_agents" / "leap_waitk_text_agent.py"
SPLITS = ("train", "valid", "test")
LATENCY_METRICS = ("AL", "LAAL", "AP", "DAL")
# SimulEval's scoring of a text run: latency in words of the detokenised output
SCORING = ("--source-type", "text", "--target-type", "text", "--quality-metrics", "BLEU",
           "--latency-metrics", *LATENCY_METRICS, "--eval-latency-unit", "word")


# ---------------------------------------------------------------------------- prepare
def read_pairs(args, split: str) -> List[Tuple[str, str]]:
    """(source, target) pairs of one split; a missing file, a wrong header or field count, an
    empty side or non-UTF-8 text stops the recipe naming the file (and line)."""
    if not args.plain_prefix:
        return read_tsv_pairs(args.corpus, split, args.src, args.tgt, "t2t", "prepare")
    src_path = Path(f"{args.plain_prefix}.{split}.{args.src}")
    tgt_path = Path(f"{args.plain_prefix}.{split}.{args.tgt}")
    for path in (src_path, tgt_path):
        if not path.is_file():
            raise RECIPE.fail(f"prepare: missing {path} (--plain-prefix)")
    sources, targets = read_lines(src_path, "t2t"), read_lines(tgt_path, "t2t")
    if len(sources) != len(targets):
        raise RECIPE.fail(f"prepare: {src_path} has {len(sources)} lines, {tgt_path} has "
                          f"{len(targets)}")
    refuse_empty(sources, src_path, "source line", "t2t")
    refuse_empty(targets, tgt_path, "target line", "t2t")
    return [(source.strip(), target.strip()) for source, target in zip(sources, targets)]


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
def run_dir(data: Path, attn_type: str, waitk: Union[int, str, None]) -> Path:
    return data / "runs" / run_label(attn_type, waitk)


def train(data: Path, config: TrainConfig) -> Run:
    """fairseq-train of ``config`` on ``data`` (the prepare output) into
    ``data/runs/<attention>_k<k>`` (``<attention>_offline`` for an offline arch)."""
    if not (data / "data-bin").is_dir():
        raise RECIPE.fail(f"train: {data / 'data-bin'} not found; run prepare first")
    try:
        resolved = resolve(config, [data / "data-bin", "--user-dir", PLUGIN, "--task",
                                    "translation"])
    except ConfigError as error:
        raise RECIPE.fail(f"train: {error}") from None
    return train_run(RECIPE, "train", resolved, run_dir(data, resolved.attn_type, resolved.waitk))


def train_command(args) -> None:
    try:
        config = config_from_arguments(args, "t2t train")
    except ConfigError as error:
        raise RECIPE.fail(f"train: {error}") from None
    train(Path(args.data), config)


# ---------------------------------------------------------------------------- distill
HYPOTHESIS = re.compile(r"H-(\d+)\t\S+\t(.*)$")


def distill(args) -> None:
    """Sequence-level knowledge distillation (Kim and Rush, 2016): ``--out`` is ``--data`` with
    each training target replaced by ``--teacher``'s beam-search translation of its source.
    Valid and test, the SentencePiece model and the dictionaries are kept, so validation losses
    on the two stay comparable. Sources the teacher cannot read (longer than its max positions)
    keep their reference target, and are counted."""
    data, out, teacher = Path(args.data), Path(args.out), Path(args.teacher)
    sides = read_recipe(data, "t2t", "distill")
    src, tgt = sides["src"], sides["tgt"]
    if not teacher.is_file():
        raise RECIPE.fail(f"distill: --teacher {teacher}: no such file")
    if out.resolve() == data.resolve():
        raise RECIPE.fail(f"distill: --out {out} is --data; give another directory")
    references = read_lines(data / f"train.spm.{tgt}", "t2t")
    out.mkdir(parents=True, exist_ok=True)
    generated = out / "generate"
    run([*FAIRSEQ_GENERATE, data / "data-bin", "--user-dir", PLUGIN, "--task", "translation",
         "--path", teacher, "--gen-subset", "train", "--beam", args.beam, "--max-tokens",
         args.max_tokens, "--skip-invalid-size-inputs-valid-test", "--results-path",
         generated], f"distill: fairseq-generate (beam {args.beam}) of the "
        f"{len(references)} training sources", log_file=out / "generate.log")
    hypotheses: Dict[int, str] = {}
    for line in read_lines(generated / "generate-train.txt", "t2t"):
        match = HYPOTHESIS.match(line.rstrip("\n"))
        if match:
            hypotheses[int(match[1])] = match[2]
    kept = {index for index in range(len(references)) if not hypotheses.get(index, "").strip()}
    targets = [hypotheses[i] if i not in kept else references[i].rstrip("\n")
               for i in range(len(references))]
    log(f"distill: {len(references) - len(kept)} targets from the teacher, {len(kept)} "
        "references kept (sources over the teacher's max positions, or empty translations)")
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(data / "spm.model"))
    write_text(out / f"train.spm.{tgt}", "".join(t + "\n" for t in targets))
    write_text(out / f"train.{tgt}", "".join(spm.decode(t.split()) + "\n" for t in targets))
    for name in [f"train.{src}", f"train.spm.{src}", "spm.model", "spm.vocab",
                 *(f"{split}{spm_}.{side}" for split in ("valid", "test")
                   for spm_ in ("", ".spm") for side in (src, tgt))]:
        shutil.copyfile(data / name, out / name)
    partial = out / ".data-bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run([*FAIRSEQ_PREPROCESS, "--source-lang", src, "--target-lang", tgt,
         "--trainpref", out / "train.spm", "--validpref", out / "valid.spm",
         "--testpref", out / "test.spm", "--destdir", partial,
         "--srcdict", data / "data-bin" / f"dict.{src}.txt",
         "--tgtdict", data / "data-bin" / f"dict.{tgt}.txt", "--workers", "2"],
        "distill: fairseq-preprocess with --data's dictionaries")
    shutil.rmtree(out / "data-bin", ignore_errors=True)
    os.replace(partial, out / "data-bin")
    write_text(out / "recipe.json", json.dumps({
        **sides, "distilled_from": {"data": str(data), "teacher": str(teacher),
                                    "beam": args.beam, "references_kept": len(kept)}}) + "\n")
    log(f"distill: done -> {out}")


# --------------------------------------------------------------------------- evaluate
def simuleval(data: Path, checkpoint: Path, output: Path, waitk: int, sentences: int,
              extra: Sequence[str] = (), quiet: bool = False, recipe: Recipe = RECIPE,
              what: Optional[str] = None, shards: int = 1) -> Dict[str, float]:
    """SimulEval CLI with the agent on the test set (or its first ``sentences``) into ``output``,
    then SimulEval's scoring; ``quiet`` sends its output to ``output/simuleval.log`` instead of
    the terminal. ``recipe`` logs and refuses (the study runner passes its own), ``what`` names
    the run in its log line and messages (default ``simuleval wait-K RUN``); ``shards``
    SimulEval processes share the sentences (:meth:`Recipe.simuleval_shards`)."""
    command = simuleval_command(data, checkpoint, output, waitk, sentences, extra, recipe)
    return recipe.simuleval(command, SCORING, output,
                            what or f"simuleval wait-{waitk} {checkpoint.parent.name}", quiet,
                            shards)


def simuleval_command(data: Path, checkpoint: Path, output: Path, waitk: int, sentences: int,
                      extra: Sequence[str] = (), recipe: Recipe = RECIPE) -> List:
    """The SimulEval CLI command of :func:`simuleval` (without its scoring flags), after checking
    the files ``prepare`` writes and copying the first ``sentences`` test lines into ``output``."""
    sides = read_recipe(data, recipe.tag, "evaluate")
    source, target = data / f"test.{sides['src']}", data / f"test.{sides['tgt']}"
    for path in (source, target, data / "data-bin", data / "spm.model"):
        if not path.exists():
            raise recipe.fail(f"evaluate: missing {path}; run prepare first")
    output.mkdir(parents=True, exist_ok=True)
    source, target = recipe.first_lines([source, target], output, sentences)
    return [*SIMULEVAL, "--agent", AGENT, "--source", source, "--target", target,
            "--checkpoint", checkpoint, "--data-bin", data / "data-bin", "--spm",
            data / "spm.model", "--waitk", waitk, "--output", output, *extra]


def evaluate(args) -> None:
    data = Path(args.data)
    runs = RECIPE.evaluation_runs(
        args.attn_types, args.waitk,
        lambda attn_type, waitk: run_dir(data, attn_type, waitk) / args.checkpoint_name, "train",
        args.multipath)

    def evaluate_run(run_spec: Tuple[str, int, Path]) -> Dict:
        name, waitk, checkpoint = run_spec
        output = data / "eval" / f"{name}_k{waitk}"
        scores = simuleval(data, checkpoint, output, waitk, args.sentences,
                           quiet=args.jobs > 1, shards=args.shards)
        log(f"evaluate: {name} wait-{waitk}: " + "  ".join(
            f"{metric} {value:.2f}" for metric, value in scores.items()))
        return {"attn_type": name, "waitk": waitk, **scores}

    rows = RECIPE.parallel(evaluate_run, runs, args.jobs)
    RECIPE.write_results(rows, ["BLEU", *LATENCY_METRICS], data / "eval", [("AL", "o-")],
                         "AL (words)")


# ------------------------------------------------------------------------------- demo
def demo(args) -> None:
    """The three steps on the built-in slice: configs/t2t/demo.yaml (LeaP wait-3, CPU)."""
    out = Path(args.out)
    corpus = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
    prepare(argparse.Namespace(corpus=str(corpus), plain_prefix=None, src="en", tgt="de",
                               out=str(out), vocab_size=args.vocab_size, max_train=0,
                               max_valid=0, max_test=args.sentences))
    try:
        config = load_config("t2t/demo", "t2t train")
        config.set("max-update", args.max_update, f"--max-update {args.max_update}")
    except ConfigError as error:
        raise RECIPE.fail(f"demo: {error}") from None
    trained = train(out, config)
    scores = simuleval(out, trained.directory / "checkpoint_last.pt",
                       out / "eval" / trained.directory.name, trained.waitk, args.sentences)
    print(f"\nDemo ({trained.attn_type} wait-{trained.waitk}, {args.max_update} updates, "
          f"{args.sentences} test sentences): "
          f"BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.2f}  LAAL {scores['LAAL']:.2f}")


def build_parser() -> argparse.ArgumentParser:
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

    p = commands.add_parser("train", help="fairseq-train a wait-k model from a configuration")
    p.add_argument("--data", required=True, help="the prepare --out directory")
    add_config_arguments(p, "t2t/small")
    p.set_defaults(run=train_command)

    p = commands.add_parser("distill", help="sequence-level knowledge distillation data: the "
                            "training targets translated by a teacher")
    p.add_argument("--data", required=True, help="the prepare --out directory")
    p.add_argument("--teacher", required=True, help="checkpoint of an offline model trained on "
                   "--data (configs/t2t/offline_screen.yaml)")
    p.add_argument("--out", required=True, help="the distilled data directory (prepare's layout)")
    p.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    p.add_argument("--max-tokens", type=int, default=8000, help="tokens per generation batch")
    p.set_defaults(run=distill)

    p = commands.add_parser("evaluate", help="SimulEval for attention types x k values")
    p.add_argument("--data", required=True)
    p.add_argument("--attn-types", default="leap,softmax",
                   help="run names' attention: a type, or encoder-decoder-cross types")
    p.add_argument("--waitk", default="3,5", help="k values, comma-separated (default 3,5)")
    p.add_argument("--multipath", metavar="SET",
                   help="evaluate the multi-path runs trained with --waitk SET (e.g. 1-9) at "
                        "each --waitk k, into eval/<attention>_k<SET>_k<k>")
    p.add_argument("--sentences", type=int, default=0, help="first N test sentences (0: all)")
    p.add_argument("--checkpoint-name", default="checkpoint_last.pt",
                   help="checkpoint file in each run directory")
    p.add_argument("--jobs", type=int, default=1,
                   help="SimulEval runs in parallel (each logs to its eval dir's simuleval.log)")
    p.add_argument("--shards", type=int, default=1, help=SHARDS_HELP)
    p.set_defaults(run=evaluate)

    p = commands.add_parser("demo", help="prepare + train + evaluate on the built-in slice")
    p.add_argument("--out", default=str(ROOT / "work" / "demo"))
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--sentences", type=int, default=100)
    p.set_defaults(run=demo)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
