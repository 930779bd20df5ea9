"""Plain and computation-aware SimulEval scores of one speech-to-text run, side by side.

SimulEval 1.1.4 cannot report both from one run: with ``--computation-aware`` its evaluator
builds the plain scorers with ``from_args(args)``, which passes ``args.computation_aware``
(``evaluator/evaluator.py:288``, ``evaluator/scorers/latency_scorer.py:108-111``), so ``AL``
equals ``AL_CA`` in its ``scores.tsv``. The recording is not affected: every speech-input
instance in ``instances.log`` carries ``delays`` (ms of source read when each target unit was
written) and ``elapsed`` (those delays plus wall-clock ms since the instance started,
``evaluator/instance.py:218-221,333-334``), with or without ``--computation-aware``.

This module rebuilds the instances from ``instances.log`` as ``--score-only`` does and runs
SimulEval's own scorer classes twice, once on ``delays`` and once on ``elapsed``::

    scores = plain_and_computation_aware_scores("eval/run1")  # {"BLEU":.., "AL":.., "AL_CA":..}
    write_scores_tsv(scores, "eval/run1/scores_plain_ca.tsv")

or ``python -m leapformer_fairseq.simuleval_scores eval/run1`` for both.
:func:`simuleval_score_only` is SimulEval's own scoring of a run made with ``--no-scoring``, with
one clear error where SimulEval's latency scorers die (no instance has a prediction). SimulEval
is imported inside the functions, so importing :mod:`leapformer_fairseq` never needs it.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

LATENCY_METRICS = ("AL", "LAAL", "AP", "DAL", "ATD")
QUALITY_METRICS = ("BLEU",)
SCORES_FILE = "scores_plain_ca.tsv"
CA_SUFFIX = "_CA"


def read_instances(log: Path) -> List[dict]:
    """Parsed records of a SimulEval ``instances.log``; raises if it is missing or if no
    instance has a prediction (SimulEval's latency scorers would die on ``mean([])``)."""
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no SimulEval instances.log (run simuleval with --output)")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not any(record.get("delays") for record in records):
        raise ValueError(f"{log}: the agent wrote nothing for any of its {len(records)} "
                         "instances, so there is no latency to score")
    return records


def _read_log(log: Path, latency_unit: str) -> List[dict]:
    """:func:`read_instances`, also refusing a log that lacks computation-aware timing or was
    written with another ``--eval-latency-unit`` than ``latency_unit``."""
    if latency_unit not in ("word", "char", "spm"):
        raise ValueError(f"latency_unit must be 'word', 'char' or 'spm', not {latency_unit!r}")
    records = read_instances(log)
    for record in records:
        delays, elapsed = record.get("delays") or [], record.get("elapsed") or []
        if delays and (len(elapsed) != len(delays) or not any(elapsed)):
            raise ValueError(
                f"{log}: instance {record.get('index')} was recorded without computation-aware "
                "timing ('elapsed' is missing, zero or not one per delay); SimulEval 1.1.4 "
                "records it for speech input with text output only")
        units = {
            "word": len(record.get("prediction", "").split()),
            "char": len(record.get("prediction", "").replace(" ", "")),
            "spm": len(record.get("prediction_spm", [])),
        }
        if units[latency_unit] != len(delays):
            raise ValueError(
                f"{log}: instance {record.get('index')} has {len(delays)} delays but "
                f"{units[latency_unit]} '{latency_unit}' units in its prediction; pass the run's "
                "--eval-latency-unit as latency_unit")
    return records


def _simuleval_args(latency_metrics: Sequence[str], quality_metrics: Sequence[str],
                    latency_unit: str, simuleval_args: Sequence[str]) -> argparse.Namespace:
    """The Namespace SimulEval's own evaluator/scorer options give for these flags."""
    from simuleval import options

    argv = ["--latency-metrics", *latency_metrics, "--quality-metrics", *quality_metrics,
            "--eval-latency-unit", latency_unit, *simuleval_args]
    parser = argparse.ArgumentParser(prog="simuleval", exit_on_error=False)
    options.add_evaluator_args(parser)
    options.add_scorer_args(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"not SimulEval evaluator/scorer options: {unknown}")
    return args


def plain_and_computation_aware_scores(
    output_dir: Union[str, Path],
    latency_metrics: Sequence[str] = LATENCY_METRICS,
    quality_metrics: Sequence[str] = QUALITY_METRICS,
    latency_unit: str = "word",
    simuleval_args: Sequence[str] = (),
) -> Dict[str, float]:
    """Scores of the SimulEval speech-to-text run written to ``output_dir``.

    Args:
        output_dir: the run's ``--output`` directory (its ``instances.log`` is read).
        latency_metrics: SimulEval latency metric names; each gives ``M`` (from delays) and
            ``M_CA`` (from elapsed times).
        quality_metrics: SimulEval quality metric names (e.g. ``BLEU``).
        latency_unit: the run's ``--eval-latency-unit`` (``word``, ``char`` or ``spm``).
        simuleval_args: further scorer flags of the run, e.g. ``["--sacrebleu-tokenizer",
            "zh"]``, ``["--no-use-ref-len"]`` or ``["--eval-latency-spm-model", "spm.model"]``.

    Returns:
        Unrounded scores keyed like SimulEval's ``scores.tsv`` columns: quality metrics first,
        then ``M, M_CA`` per latency metric.
    """
    from simuleval.evaluator.instance import LogInstance
    from simuleval.evaluator.scorers import get_scorer_class

    log = Path(output_dir) / "instances.log"
    records = _read_log(log, latency_unit)
    args = _simuleval_args(latency_metrics, quality_metrics, latency_unit, simuleval_args)
    spm_model = None
    if latency_unit == "spm":
        import sentencepiece

        if not args.eval_latency_spm_model:
            raise ValueError("latency_unit 'spm' needs --eval-latency-spm-model in simuleval_args")
        spm_model = sentencepiece.SentencePieceProcessor(model_file=args.eval_latency_spm_model)
    # Keyed 0.. in log order, as SimulEval's build_instances_from_log does (ATD reads key 0).
    instances = {}
    for position, record in enumerate(records):
        instances[position] = LogInstance(json.dumps(record), latency_unit)
        instances[position].set_target_spm_model(spm_model)

    scores = {name: float(get_scorer_class("quality", name).from_args(args)(instances))
              for name in quality_metrics}
    for name in latency_metrics:
        scorer_class = get_scorer_class("latency", name)
        for suffix, aware in (("", False), (CA_SUFFIX, True)):
            scorer_args = argparse.Namespace(**{**vars(args), "computation_aware": aware})
            scores[name + suffix] = float(scorer_class.from_args(scorer_args)(instances))
    return scores


def simuleval_score_only(output_dir: Union[str, Path],
                         simuleval_args: Sequence[str]) -> Dict[str, float]:
    """SimulEval's own scoring (``simuleval --score-only``) of the run in ``output_dir``, which
    writes ``scores.tsv`` and ``metrics.tsv`` as a scoring run does; returns the scores.

    ``simuleval_args``: the run's scoring flags (``--source-type``, ``--target-type``,
    ``--quality-metrics``, ``--latency-metrics``, ``--eval-latency-unit``,
    ``--computation-aware``, ...). A run whose agent wrote nothing is refused first
    (:func:`read_instances`), where SimulEval dies with ``statistics.StatisticsError``.
    """
    from simuleval import options
    from simuleval.evaluator import SentenceLevelEvaluator

    output = Path(output_dir)
    read_instances(output / "instances.log")
    argv = ["--output", str(output), "--score-only", "--no-progress-bar", *simuleval_args]
    parser = options.general_parser()
    options.add_evaluator_args(parser)
    options.add_scorer_args(parser, argv)
    options.add_dataloader_args(parser, argv)
    evaluator = SentenceLevelEvaluator.from_args(parser.parse_args(argv))
    evaluator.dump_results()
    evaluator.dump_metrics()
    return read_scores_tsv(output / "scores.tsv")


def write_scores_tsv(scores: Mapping[str, float], path: Union[str, Path]) -> Path:
    """Writes ``scores`` as one header line and one value line, rounded to 3 decimals like
    SimulEval's ``scores.tsv``; returns ``path``."""
    path = Path(path)
    values = [str(round(float(value), 3)) for value in scores.values()]
    path.write_text("\t".join(scores) + "\n" + "\t".join(values) + "\n")
    return path


def read_scores_tsv(path: Union[str, Path]) -> Dict[str, float]:
    """Reads a one-row scores TSV (SimulEval's ``scores.tsv`` or :func:`write_scores_tsv`'s)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if len(lines) != 2:
        raise ValueError(f"{path}: expected a header line and one value line")
    header, values = (line.split("\t") for line in lines)
    return {name: float(value) for name, value in zip(header, values, strict=True)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """CLI: writes ``OUTPUT_DIR/scores_plain_ca.tsv`` and prints it; returns the scores."""
    parser = argparse.ArgumentParser(
        description="Plain and computation-aware SimulEval scores of one speech-to-text run "
        f"(writes OUTPUT_DIR/{SCORES_FILE}). Unknown flags go to SimulEval's scorers.")
    parser.add_argument("output_dir", type=Path, help="the run's simuleval --output directory")
    parser.add_argument("--latency-metrics", nargs="+", default=list(LATENCY_METRICS))
    parser.add_argument("--quality-metrics", nargs="+", default=list(QUALITY_METRICS))
    parser.add_argument("--eval-latency-unit", default="word", choices=["word", "char", "spm"])
    args, simuleval_args = parser.parse_known_args(argv)
    scores = plain_and_computation_aware_scores(
        args.output_dir, args.latency_metrics, args.quality_metrics, args.eval_latency_unit,
        simuleval_args)
    path = write_scores_tsv(scores, args.output_dir / SCORES_FILE)
    print(path.read_text(), end="")
    return scores


if __name__ == "__main__":
    main()
