"""Sharded SimulEval: ``t2t_recipe.py evaluate --shards 3`` runs three ``simuleval`` processes
on contiguous shares of the test sentences and joins their logs; BLEU and the plain latency
metrics of the joined log equal those of one process on all sentences, instance by instance
(the model is random: equality does not depend on what it emits). Computation-aware numbers
depend on the machine's load and are only reported, not compared."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_errors import WAITK_TEXT, save_random_checkpoint

from leapformer_fairseq.recipes import t2t
from leapformer_fairseq.simuleval_scores import read_scores_tsv

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
SENTENCES = 10


def evaluate(data: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "evaluate", "--data",
         str(data), "--attn-types", "leap", "--waitk", "2", "--sentences", str(SENTENCES),
         *options], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(unsharded run folder, sharded run folder) of one random checkpoint."""
    root = tmp_path_factory.mktemp("shards")
    data = root / "data"
    t2t.main(["prepare", "--corpus", str(TSV), "--out", str(data), "--max-train", "100",
              "--max-valid", "5", "--max-test", str(SENTENCES), "--vocab-size", "200"])
    (data / "runs" / "leap_k2").mkdir(parents=True)
    save_random_checkpoint(data / "runs" / "leap_k2" / "checkpoint_last.pt",
                           [data / "data-bin", *WAITK_TEXT])
    done = evaluate(data)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = data / "eval" / "leap_k2"
    whole.rename(root / "whole")
    done = evaluate(data, "--shards", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "whole", whole


def test_joined_log_scores_like_one_process(runs):
    whole, sharded = runs
    assert sorted(path.name for path in (sharded / "shards").iterdir()) == ["0", "1", "2"]
    sizes = [len((sharded / "shards" / i / "instances.log").read_text().splitlines())
             for i in "012"]
    assert sizes == [3, 4, 3]
    expected, joined = (read_scores_tsv(run / "scores.tsv") for run in (whole, sharded))
    assert expected.keys() == joined.keys()
    for metric in ("BLEU", "AL", "LAAL", "AP", "DAL"):
        assert joined[metric] == expected[metric], metric
    records = [[json.loads(line) for line in (run / "instances.log").read_text().splitlines()]
               for run in (whole, sharded)]
    assert [r["index"] for r in records[1]] == list(range(SENTENCES))
    for key in ("prediction", "delays", "reference"):
        assert [r[key] for r in records[1]] == [r[key] for r in records[0]], key


def test_more_shards_than_sentences_are_refused(runs):
    _, sharded = runs
    data = sharded.parents[1]
    done = evaluate(data, "--shards", str(SENTENCES + 1))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"[t2t] simuleval wait-2 leap_k2: --shards {SENTENCES + 1}: between 1 and the "
        f"{SENTENCES} instances")
