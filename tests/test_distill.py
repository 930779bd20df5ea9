"""Sequence-level distillation data (``t2t_recipe.py distill``): an offline teacher trained by the
recipe (configs/t2t/offline_screen.yaml at tiny size) translates the training sources with
fairseq-generate; each training target becomes the teacher's translation of its own source,
sources over the teacher's max positions keep their reference, valid, test and the dictionaries
are kept, and what fairseq-train reads back is the distilled text."""
from pathlib import Path

import pytest

from leapformer_fairseq.recipes import t2t
from leapformer_fairseq.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
MAX_SOURCE = 24  # the teacher's max source positions: the longer training sources are skipped


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    t2t.main(["prepare", "--corpus", str(TSV), "--out", str(data), "--max-train", "60",
              "--max-valid", "5", "--max-test", "3", "--vocab-size", "200"])
    config = load_config("t2t/offline_screen")
    for key, value in (("arch", "leapformer_transformer_tiny"), ("max-update", 2),
                       ("cpu", True), ("max-source-positions", MAX_SOURCE),
                       ("encoder-embed-dim", 32), ("decoder-embed-dim", 32),
                       ("disable-validation", True)):
        config.set(key, value, "test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        run = t2t.train(data, config)
        t2t.main(["distill", "--data", str(data), "--teacher",
                  str(run.directory / "checkpoint_last.pt"), "--out", str(root / "kd"),
                  "--beam", "2"])
    return data, root / "kd", run


def lines(path: Path):
    return path.read_text(encoding="utf-8").splitlines()


def test_the_offline_teacher_is_a_recipe_run(distilled):
    _, _, run = distilled
    assert run.waitk is None and run.directory.name == "softmax_offline"


def test_each_target_is_the_teachers_translation_of_its_source(distilled):
    data, kd, _ = distilled
    hypotheses = {}
    for line in lines(kd / "generate" / "generate-train.txt"):
        if line.startswith("H-"):
            name, _, text = line.split("\t")
            hypotheses[int(name[2:])] = text
    sources, references = lines(data / "train.spm.en"), lines(data / "train.spm.de")
    targets = lines(kd / "train.spm.de")
    assert lines(kd / "train.spm.en") == sources and len(targets) == len(sources) == 60
    lengths = [len(source.split()) + 1 for source in sources]  # with EOS
    # the teacher translated the sources under its max positions, and none over them
    assert {i for i, n in enumerate(lengths) if n < MAX_SOURCE} <= set(hypotheses) \
        <= {i for i, n in enumerate(lengths) if n <= MAX_SOURCE}
    assert 0 < len(hypotheses) < len(sources)
    for index, target in enumerate(targets):
        expected = hypotheses[index] if hypotheses.get(index, "").strip() else references[index]
        assert target == expected, index
    kept = sum(1 for i in range(60) if not hypotheses.get(i, "").strip())
    assert f'"references_kept": {kept}' in (kd / "recipe.json").read_text()


def test_valid_test_and_dictionaries_are_kept(distilled):
    data, kd, _ = distilled
    for name in ("valid.en", "valid.de", "test.spm.en", "test.spm.de", "spm.model",
                 "data-bin/dict.en.txt", "data-bin/dict.de.txt"):
        assert (kd / name).read_bytes() == (data / name).read_bytes(), name


def test_fairseq_reads_back_the_distilled_targets(distilled):
    from fairseq.data import Dictionary, data_utils

    _, kd, _ = distilled
    dictionary = Dictionary.load(str(kd / "data-bin" / "dict.de.txt"))
    dataset = data_utils.load_indexed_dataset(str(kd / "data-bin" / "train.en-de.de"),
                                              dictionary)
    targets = lines(kd / "train.spm.de")
    assert [dictionary.string(dataset[i]) for i in range(len(dataset))] == targets


def test_distill_refuses_a_missing_teacher_and_writing_over_its_data(distilled, tmp_path):
    data, _, run = distilled
    with pytest.raises(SystemExit, match="--teacher .*none.pt: no such file"):
        t2t.main(["distill", "--data", str(data), "--teacher", str(tmp_path / "none.pt"),
                  "--out", str(tmp_path / "kd")])
    with pytest.raises(SystemExit, match="--out .* is --data"):
        t2t.main(["distill", "--data", str(data), "--teacher",
                  str(run.directory / "checkpoint_last.pt"), "--out", str(data)])
