"""The documented MuST-C commands (docs/recipes.md, "Speech-to-text recipe") end to end at tiny
size: every ``scripts/s2t_recipe.py`` line of that block runs as a command, in order, on a
synthetic MuST-C layout (one noise talk per split, gettext-mt text, ``tst-HE`` included), with
``MUSTC_ROOT`` and ``work/s2t-en-de`` replaced by temporary paths, the tiny arch and 2 updates
appended to each ``train-*`` line and 2 sentences to each ``evaluate`` line. Nothing here
depends on what the models emit."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
from test_errors import mustc_tree

from leapformer_fairseq.simuleval_scores import read_scores_tsv

ROOT = Path(__file__).resolve().parents[1]
SPLITS = (("train", "train"), ("dev", "valid"), ("tst-COMMON", "test"), ("tst-HE", "test"))
TINY = ["--set", "arch=leapformer_s2t_waitk_tiny", "--set", "max-update=2", "--cpu"]


def documented_commands() -> List[List[str]]:
    """The ``python scripts/s2t_recipe.py`` lines of the recipe's first bash block."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## Speech-to-text recipe", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines()
            if line.startswith("python scripts/s2t_recipe.py")]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mustc")
    mustc = mustc_tree(root / "mustc", SPLITS, segments=6)
    out = root / "s2t-en-de"
    commands = documented_commands()
    for command in commands:
        command = [str(mustc) if word == "MUSTC_ROOT" else
                   str(out) if word == "work/s2t-en-de" else word for word in command]
        step = command[2]
        extra = TINY if step.startswith("train-") else \
            ["--sentences", "2", "--segment-ms", "400"] if step == "evaluate" else \
            ["--vocab-size-asr", "60", "--vocab-size-st", "60"]
        done = subprocess.run([sys.executable, *command[1:], *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, (" ".join(command), (done.stdout + done.stderr)[-3000:])
    return out, commands


def test_the_block_prepares_trains_and_evaluates_leap_and_softmax(recipe_run):
    _, commands = recipe_run
    steps = [(command[2], *[word for word in command if word in ("leap", "softmax")])
             for command in commands]
    assert steps[0] == ("prepare",)
    for attn_type in ("leap", "softmax"):
        assert ("train-asr", attn_type) in steps and ("train-st", attn_type) in steps
    assert [command for command in commands if "evaluate" in command][-1][-2:] == \
        ["--test-set", "heldout"]


def test_st_runs_start_from_their_asr_encoder_at_the_base_recipe(recipe_run):
    out, _ = recipe_run
    for attn_type in ("leap", "softmax"):
        checkpoint = torch.load(out / "runs" / f"st_{attn_type}_k5" / "checkpoint_last.pt",
                                weights_only=False)
        args = checkpoint["cfg"]["model"]
        assert checkpoint["optimizer_history"][-1]["num_updates"] == 2
        assert (args.arch, args.encoder_attn_type, args.cross_attn_type) == \
            ("leapformer_s2t_waitk_tiny", attn_type, attn_type)
        assert (args.waitk_lagging, args.frames_per_unit) == (5, 9)  # s2t/st_base's schedule
        assert args.encoder_initialized_from == \
            str(out / "runs" / f"asr_{attn_type}_k5" / "checkpoint_last.pt")


@pytest.mark.parametrize("test_set", ["eval", "heldout"])
def test_both_test_sets_are_scored_for_both_attentions(recipe_run, test_set):
    out, _ = recipe_run
    rows = json.loads((out / test_set / "results.json").read_text())
    assert sorted(row["attn_type"] for row in rows) == ["leap", "softmax"]
    for attn_type in ("leap", "softmax"):
        run = out / test_set / f"{attn_type}_k5"
        scores = read_scores_tsv(run / "scores_plain_ca.tsv")
        assert scores["AL_CA"] > scores["AL"] > 0
        assert len((run / "instances.log").read_text().splitlines()) == 2
    assert (out / "heldout.de").read_text() == (out / "eval.de").read_text()
