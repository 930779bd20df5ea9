"""The shell recipes (scripts/run_t2t_waitk.sh, scripts/run_mustc_simulst.sh): their
fairseq-train commands (printed with DRY_RUN=1) are the Python recipes' for the same
configuration and overrides, option for option; and each runs end to end at smoke size, the
text one on the built-in corpus, the MuST-C one on a synthetic MuST-C layout."""
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from test_errors import mustc_tree

from leapformer_fairseq.recipes import s2t, t2t
from leapformer_fairseq.recipes.common import PLUGIN
from leapformer_fairseq.recipes.config import SHORTCUTS, config_from_arguments, resolve
from leapformer_fairseq.simuleval_scores import read_scores_tsv

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
MUSTC_SPLITS = (("train", "train"), ("dev", "valid"), ("tst-COMMON", "test"), ("tst-HE", "test"))


def shell_recipe(name: str, **variables: str) -> List[List[str]]:
    """Run ``scripts/<name>`` with ``variables``; the commands it printed."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / name)], cwd=ROOT, text=True,
                          env={**ENV, **variables}, capture_output=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def options(argv: Sequence[str]) -> Dict[str, object]:
    """fairseq-train arguments as {option: value} (flags: True; the data path under ""), with
    --user-dir resolved to a path."""
    parsed: Dict[str, object] = {"": str(argv[0])}
    words = list(map(str, argv[1:]))
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") \
                else True
            parsed[word] = value
    parsed["--user-dir"] = str((ROOT / str(parsed["--user-dir"])).resolve())
    return parsed


def python_recipe_command(recipe, step: str, base: List, save_dir: str,
                          overrides: List[str]) -> Dict[str, object]:
    """The fairseq-train arguments the Python ``recipe`` gives ``step`` with ``overrides``."""
    args = recipe.build_parser().parse_args([step, "--data", "D", *overrides])
    shortcuts = getattr(recipe, "TRAIN_SHORTCUTS", SHORTCUTS)  # as the recipe's train step
    config = config_from_arguments(args, f"{recipe.RECIPE.tag} {step}", shortcuts)
    return options(resolve(config, base).command(Path(save_dir)))


OVERRIDES = {"ATTN": "softmax", "WAITK": "4", "MAX_UPDATE": "7"}


def test_text_shell_recipe_trains_with_the_python_recipes_command():
    out = "work/dry-t2t"
    commands = shell_recipe("run_t2t_waitk.sh", DRY_RUN="1", OUT=out, **OVERRIDES)
    assert [command[0] for command in commands] == ["python", "fairseq-train", "simuleval"]
    expected = python_recipe_command(
        t2t, "train", [f"{out}/data-bin", "--user-dir", PLUGIN, "--task", "translation"],
        f"{out}/runs/softmax_k4", ["--attn-type", "softmax", "--waitk", "4", "--set",
                                   "max-update=7"])
    assert options(commands[1][1:]) == expected


def test_mustc_shell_recipe_trains_with_the_python_recipes_commands():
    out = "work/dry-s2t"
    commands = shell_recipe("run_mustc_simulst.sh", DRY_RUN="1", OUT=out, MUSTC_ROOT="M",
                            FRAMES_PER_UNIT="6", **OVERRIDES)
    trainings = [command for command in commands if command[0] == "fairseq-train"]
    assert len(trainings) == 2
    overrides = ["--attn-type", "softmax", "--waitk", "4", "--frames-per-unit", "6", "--set",
                 "max-update=7"]
    for command, task in zip(trainings, ("asr", "st")):
        base = [out, "--user-dir", PLUGIN, "--task", "speech_to_text", "--config-yaml",
                f"config_{task}.yaml", "--train-subset", f"train_{task}", "--valid-subset",
                f"dev_{task}"]
        if task == "st":  # what s2t.train adds: the encoder of the ASR run
            base += ["--load-pretrained-encoder-from",
                     f"{out}/runs/asr_softmax_k4/checkpoint_last.pt"]
        expected = python_recipe_command(s2t, f"train-{task}", base,
                                         f"{out}/runs/{task}_softmax_k4", overrides)
        assert options(command[1:]) == expected, task


def test_text_shell_recipe_runs_at_smoke_size(tmp_path):
    out = tmp_path / "t2t"
    shell_recipe("run_t2t_waitk.sh", OUT=str(out), CORPUS=str(
        ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"), MAX_TRAIN="200", VOCAB_SIZE="300",
        ARCH="leapformer_waitk_transformer_tiny", MAX_UPDATE="2", TRAIN_EXTRA="--cpu",
        SENTENCES="3")
    scores = read_scores_tsv(out / "runs" / "leap_k3" / "eval" / "scores.tsv")
    assert {"BLEU", "AL", "LAAL", "AP", "DAL"} <= set(scores)
    assert len((out / "runs" / "leap_k3" / "eval" / "instances.log").read_text().splitlines()) \
        == 3


@pytest.fixture(scope="module")
def mustc_shell_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mustc-shell")
    shell_recipe("run_mustc_simulst.sh", OUT=str(root / "out"), MUSTC_ROOT=str(
        mustc_tree(root / "mustc", MUSTC_SPLITS, segments=6)), VOCAB_SIZE="60",
        ARCH="leapformer_s2t_waitk_tiny", MAX_UPDATE="2", TRAIN_EXTRA="--cpu", SENTENCES="2",
        SEGMENT_MS="400")
    return root / "out"


@pytest.mark.parametrize("test_set", ["eval", "heldout"])
def test_mustc_shell_recipe_runs_at_smoke_size(mustc_shell_run, test_set):
    run = mustc_shell_run / "runs" / "st_leap_k5" / test_set
    scores = read_scores_tsv(run / "scores_plain_ca.tsv")
    assert scores["AL_CA"] > scores["AL"] > 0
    assert len((run / "instances.log").read_text().splitlines()) == 2
