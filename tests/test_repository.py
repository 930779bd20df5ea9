"""The repository stands on its own: no tracked file cites a document or a path outside it."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# citations of what users do not have: the team's old math notes, the folder beside the checkout,
# and absolute paths of the machine that wrote a file (as patterns, so this file cites none)
OUTSIDE = re.compile(r"LEAP\.md|\.\./shared|/work/\w")


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file():
            try:
                yield name, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # images and other binaries
                continue


def test_no_tracked_file_cites_outside_the_repository():
    citations = [f"{name}:{number}: {line.strip()}"
                 for name, text in tracked_text_files()
                 for number, line in enumerate(text.splitlines(), start=1)
                 if OUTSIDE.search(line)]
    assert not citations, "\n".join(citations)


def test_cited_docs_exist():
    """Every page ``docs/<name>.md`` that a tracked file mentions is in the repository."""
    missing = {f"{name}: {doc}" for name, text in tracked_text_files()
               for doc in re.findall(r"docs/[\w-]+\.md", text) if not (ROOT / doc).is_file()}
    assert not missing, sorted(missing)
