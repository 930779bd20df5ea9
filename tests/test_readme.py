"""The README stays short, and its marked snippets run as written, at smoke size.

A code block right after ``<!-- smoke -->`` is run: shell blocks with bash (the interpreter's
``bin`` first on ``PATH``, as after activating ``.venv``), Python blocks with the interpreter,
from the repository root. Two substitutions make them small without changing what they do: the
demo's directory ``work/demo`` becomes one prepared here from the built-in slice (10 test
sentences), and ``--max-update 300`` becomes ``--max-update 2``. The snippets after training
read the demo's run ``runs/leap_k3``; here that is the run the training snippet wrote.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKED = re.compile(r"<!-- smoke -->\n```(bash|python)\n(.*?)```", flags=re.S)
TEST_SENTENCES = 10


def run(command, **options):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(c) for c in command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **options)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_readme_is_at_most_150_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


def test_marked_snippets_run(tmp_path):
    blocks = MARKED.findall(README.read_text(encoding="utf-8"))
    assert [kind for kind, _ in blocks] == ["bash", "python", "bash"]  # train, stream, SimulEval
    demo = tmp_path / "demo"
    run([sys.executable, ROOT / "scripts" / "t2t_recipe.py", "prepare", "--corpus",
         ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv", "--src", "en", "--tgt", "de",
         "--out", demo, "--max-train", 1000, "--max-valid", 50, "--max-test", TEST_SENTENCES,
         "--vocab-size", 1000])
    outputs = []
    for kind, text in blocks:
        text = text.replace("work/demo", str(demo)).replace("--max-update 300", "--max-update 2")
        command = ["bash", "-c", text] if kind == "bash" else [sys.executable, "-c", text]
        outputs.append(run(command))
        if not (demo / "runs" / "leap_k3").exists():
            (demo / "runs" / "leap_k3").symlink_to(demo / "runs" / "my_leap_k3")
    assert (demo / "runs" / "my_leap_k3" / "checkpoint_last.pt").is_file()
    assert outputs[1].split()[-1] == "</s>"  # the stream ran to its end
    instances = (demo / "eval" / "leap_k3" / "instances.log").read_text().splitlines()
    assert len(instances) == TEST_SENTENCES
