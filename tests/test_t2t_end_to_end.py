"""Recipe end to end on a tiny slice: prepare -> fairseq-train -> simuleval CLI with our agent.

The agent's streamed outputs must equal offline wait-k greedy decoding of the same checkpoint,
compared as the agent is specified to write them: whole words, whitespace-normalised. Nothing
here depends on what the undertrained models emit. The recipe runs on one torch thread, so the
checkpoints are the same whatever the machine's core count.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece

from leapformer_fairseq.models.streaming import load_streaming_model, waitk_greedy_decode

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py")]
SENTENCES = 20


def recipe(*arguments):
    done = subprocess.run([*RECIPE, *map(str, arguments)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    data = tmp_path_factory.mktemp("t2t")
    recipe("prepare", "--corpus", ROOT / "data/gettext-mt/en-de.{split}.tsv", "--out", data,
           "--max-train", 1500, "--max-valid", 50, "--max-test", SENTENCES, "--vocab-size", 1000)
    for attn_type in ("leap", "softmax"):
        recipe("train", "--data", data, "--attn-type", attn_type, "--waitk", 3, "--arch",
               "leapformer_waitk_transformer_tiny", "--max-update", 250, "--warmup", 20,
               "--lr", 0.01, "--max-tokens", 2000, "--cpu")
    table = recipe("evaluate", "--data", data, "--attn-types", "leap,softmax", "--waitk", 3,
                   "--sentences", SENTENCES)
    return data, table


def test_scores_table_and_plot(evaluated):
    data, table = evaluated
    for attn_type in ("leap", "softmax"):
        header, values = (data / "eval" / f"{attn_type}_k3" / "scores.tsv").read_text() \
            .splitlines()[:2]
        scores = dict(zip(header.split("\t"), map(float, values.split("\t"))))
        assert {"BLEU", "AL", "LAAL", "AP", "DAL"} <= set(scores)
        assert 0.0 <= scores["BLEU"] <= 100.0
        assert 0.0 < scores["AL"] < 40.0  # words; wait-3 on short sentences
    rows = json.loads((data / "eval" / "results.json").read_text())
    assert [(r["attn_type"], r["waitk"]) for r in rows] == [("leap", 3), ("softmax", 3)]
    assert (data / "eval" / "bleu_vs_al.png").stat().st_size > 1000
    assert "| leap | 3 |" in table


@pytest.mark.parametrize("attn_type", ["leap", "softmax"])
def test_agent_output_equals_offline_waitk_greedy(evaluated, attn_type):
    data, _ = evaluated
    model, task = load_streaming_model(
        str(data / "runs" / f"{attn_type}_k3" / "checkpoint_last.pt"), str(data / "data-bin"))
    spm = sentencepiece.SentencePieceProcessor(model_file=str(data / "spm.model"))
    sources = (data / "test.en").read_text(encoding="utf-8").splitlines()[:SENTENCES]
    log = data / "eval" / f"{attn_type}_k3" / "instances.log"
    predictions = [json.loads(line)["prediction"] for line in log.read_text().splitlines()]
    assert len(predictions) == SENTENCES
    for source, prediction in zip(sources, predictions):
        pieces = [p for word in source.split() for p in spm.encode(word, out_type=str)]
        ids = [task.source_dictionary.index(p) for p in pieces]
        offline = waitk_greedy_decode(model, ids)
        expected = spm.decode_pieces([task.target_dictionary[t] for t in offline
                                      if t != task.target_dictionary.eos()])
        assert prediction.split() == expected.split(), source
