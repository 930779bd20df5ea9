"""Multi-path wait-k (``--waitk-lagging 1-5``): the option's forms, a k drawn per training batch
from torch's generator, the middle k outside training, one model streaming at every k equal to
its offline decoding at that k, no default k to stream with, and the recipe's evaluation of a
multi-path run at several k."""
import json
import sys
from pathlib import Path

import pytest
import torch
from test_streaming import build_waitk_model, random_sentences, stream_translate

from leapformer_fairseq.models.leapformer_transformer import waitk_lagging_value, waitk_lags
from leapformer_fairseq.models.streaming import waitk_greedy_decode

ROOT = Path(__file__).resolve().parents[1]
LAGS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("value, lags", [
    (3, (3,)), ("3", (3,)), ("1-9", tuple(range(1, 10))), ("5,1,3", (1, 3, 5)),
    ("1-3,7", (1, 2, 3, 7)), (" 2-4 ", (2, 3, 4)),
])
def test_waitk_lagging_forms(value, lags):
    assert waitk_lags(waitk_lagging_value(value) if isinstance(value, str) else value) == lags


@pytest.mark.parametrize("value", [0, -1, "0-3", "3-1", "1,1", "1-3,2", "a", "1-", "", None,
                                   "1.5"])
def test_bad_waitk_lagging_is_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="--waitk-lagging must be an integer >= 1, a range such "
                                         f"as 1-9 or a list such as 1,3,5; got {value}"):
        waitk_lags(value)


def test_fairseq_parses_one_k_as_an_integer_and_a_set_as_its_text():
    from fairseq import options

    for given, parsed in (("3", 3), ("1-9", "1-9")):
        args = options.parse_args_and_arch(options.get_training_parser(), [
            "data", "--arch", "leapformer_waitk_transformer_tiny", "--task", "translation",
            "--waitk-lagging", given])
        assert args.waitk_lagging == parsed


def multipath_model(seed=0):
    model, dictionary = build_waitk_model("leap", waitk="1-5", seed=seed)
    single = {}
    for k in LAGS:
        single[k], _ = build_waitk_model("leap", waitk=k, seed=seed)
        single[k].load_state_dict(model.state_dict())
    return model, single, dictionary


def batch(dictionary, seed=2):
    sentences = random_sentences(dictionary, count=4, seed=seed)
    length = max(map(len, sentences)) + 1
    source = torch.full((4, length), dictionary.pad())
    for row, sentence in enumerate(sentences):  # left padding, as fairseq's batches
        source[row, length - len(sentence) - 1:] = torch.tensor(sentence + [dictionary.eos()])
    lengths = source.ne(dictionary.pad()).sum(1)
    target = torch.randint(dictionary.nspecial, len(dictionary), (4, 9))
    return source, lengths, target


def test_outside_training_the_middle_k_and_in_training_a_drawn_k():
    model, single, dictionary = multipath_model()
    cross = model.decoder.cross_attention_config
    assert (cross.waitk_lagging, cross.waitk_train_lags) == (3, LAGS)
    source, lengths, target = batch(dictionary)
    outputs = {k: single[k](source, lengths, target)[0] for k in LAGS}
    assert all(not torch.allclose(outputs[k], outputs[3]) for k in LAGS if k != 3)
    torch.testing.assert_close(model(source, lengths, target)[0], outputs[3], rtol=0, atol=0)
    drawn = set()
    model.train()  # dropout 0: the k is the only difference
    for seed in range(12):
        torch.manual_seed(seed)
        expected = LAGS[int(torch.randint(len(LAGS), ()))]
        torch.manual_seed(seed)
        torch.testing.assert_close(model(source, lengths, target)[0], outputs[expected],
                                   rtol=0, atol=0)
        drawn.add(expected)
        assert all(layer.encoder_attn.waitk_lagging == 3 for layer in model.decoder.layers)
    assert len(drawn) >= 3
    # a single-k model in training is its own k, without drawing
    single[2].train()
    torch.testing.assert_close(single[2](source, lengths, target)[0], outputs[2], rtol=0, atol=0)


def test_the_k_is_restored_when_a_forward_fails():
    model, _, _ = multipath_model()
    model.train()
    with pytest.raises(Exception):
        model.decoder(torch.zeros(1, 3, dtype=torch.long), encoder_out={})
    assert all(layer.encoder_attn.waitk_lagging == 3 for layer in model.decoder.layers)


@pytest.mark.parametrize("waitk", LAGS)
def test_one_model_streams_every_k_as_its_offline_decoding(waitk):
    model, _, dictionary = multipath_model(seed=1)
    outputs = set()
    for index, source in enumerate(random_sentences(dictionary, count=8)):
        offline = waitk_greedy_decode(model, source, waitk=waitk)
        for recompute in (False, True):
            assert stream_translate(model, source, index, recompute, waitk).target == offline
        outputs.add(tuple(offline))
    assert len(outputs) > 4, "degenerate outputs would make this test vacuous"


def test_a_multipath_model_has_no_default_k_to_stream_with():
    model, single, dictionary = multipath_model()
    message = r"trained for every k in \[1, 2, 3, 4, 5\] \(multi-path wait-k\); give the k"
    with pytest.raises(ValueError, match=message):
        model.start_stream()
    with pytest.raises(ValueError, match=message):
        waitk_greedy_decode(model, [5, 6, 7])
    assert single[3].start_stream().waitk == 3
    with pytest.raises(ValueError, match="waitk must be >= 1, got 0"):
        single[3].start_stream(waitk=0)


def test_fairseq_train_saves_a_multipath_model_that_loads_as_one(tmp_path):
    """--waitk-lagging 1-3 through fairseq-train (its hydra conversion included) and back."""
    from fairseq import checkpoint_utils
    from test_convert import run, train_command

    code, output = run([sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "prepare",
                        "--corpus", str(ROOT / "data/gettext-mt/en-de.{split}.tsv"),
                        "--out", str(tmp_path), "--max-train", "60", "--max-valid", "5",
                        "--max-test", "2", "--vocab-size", "200"])
    assert code == 0, output[-4000:]
    command = train_command(tmp_path / "data-bin", tmp_path / "run", "leap")
    command[command.index("--waitk-lagging") + 1] = "1-3"
    code, output = run(command)
    assert code == 0, output[-4000:]
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp_path / "run" / "checkpoint_last.pt")])
    cross = models[0].decoder.cross_attention_config
    assert (cross.waitk_lagging, cross.waitk_train_lags) == (2, (1, 2, 3))


def test_the_recipe_evaluates_a_multipath_run_at_each_k(tmp_path):
    """t2t_recipe.py evaluate --multipath 1-3 --waitk 1,3: the one checkpoint of
    runs/leap_k1-3, SimulEval at k = 1 and 3 into eval/leap_k1-3_k<k>; sets given as --waitk,
    k values outside the set and an untrained set are refused. The model trains as
    test_study.py's (untied embeddings, no dropout, 40 updates) so that SimulEval has output to
    score; no score is checked, only that each evaluation ran at its k."""
    from test_convert import run, train_command

    script = [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py")]
    code, output = run([*script, "prepare", "--corpus",
                        str(ROOT / "data/gettext-mt/en-de.{split}.tsv"), "--out", str(tmp_path),
                        "--max-train", "200", "--max-valid", "10", "--max-test", "4",
                        "--vocab-size", "1500"])
    assert code == 0, output[-4000:]
    command = train_command(tmp_path / "data-bin", tmp_path / "runs" / "leap_k1-3", "leap",
                            "--dropout", "0", "--lr-scheduler", "inverse_sqrt",
                            "--warmup-updates", "10", "--max-tokens", "1000")
    command.remove("--share-all-embeddings")
    for flag, value in (("--waitk-lagging", "1-3"), ("--lr", "0.01"), ("--max-update", "40")):
        command[command.index(flag) + 1] = value
    code, output = run(command)
    assert code == 0, output[-4000:]

    evaluate = [*script, "evaluate", "--data", str(tmp_path), "--attn-types", "leap"]
    code, output = run([*evaluate, "--multipath", "1-3", "--waitk", "1,3"])
    assert code == 0, output[-4000:]
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(row["attn_type"], row["waitk"]) for row in rows] == [("leap_k1-3", 1),
                                                                  ("leap_k1-3", 3)]
    checkpoint = tmp_path / "runs" / "leap_k1-3" / "checkpoint_last.pt"
    for k in (1, 3):
        eval_dir = tmp_path / "eval" / f"leap_k1-3_k{k}"
        assert f"--checkpoint {checkpoint} " in output
        assert f"--waitk {k} --output {eval_dir} " in output
        assert len((eval_dir / "instances.log").read_text().splitlines()) == 4
    for flags, message in (
            (["--waitk", "1-3"], "[t2t] evaluate: --waitk 1-3: single k values >= 1, "
                                 "comma-separated; a multi-path model is evaluated with "
                                 "--multipath SET (e.g. --multipath 1-9 --waitk 1,3,5)"),
            (["--multipath", "1-3", "--waitk", "5"],
             "[t2t] evaluate: --waitk 5 is not in --multipath 1-3, the k values the model was "
             "trained for"),
            (["--multipath", "1-4", "--waitk", "2"],
             f"[t2t] evaluate: missing {tmp_path / 'runs' / 'leap_k1-4' / 'checkpoint_last.pt'}"
             "; run train --attn-type leap --waitk 1-4 first")):
        code, output = run([*evaluate, *flags])
        assert code == 1 and output.strip().splitlines()[-1] == message
