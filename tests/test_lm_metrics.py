"""Metrics comparable with the literature: the text counts of a split (bytes, characters, words, lines) and the
per-byte / per-character / per-word values computed from them, against numbers worked out by hand; the counts
recorded by preprocessing and counted from raw bytes; the validation results of the best step in results.json."""
import json
import math
import types

import numpy as np
import pytest

from vqmoe_ds.data.text_counts import TextCounter, count_block, count_bytes
from vqmoe_ds.training.metrics import lm_metrics

TEXT = "héllo wörld\nfoo  bar\n\nbaz".encode("utf-8")
# by hand: bytes h é(2) l l o=6, ' '=1, w ö(2) r l d=6, \n, foo=3, '  '=2, bar=3, \n, \n, baz=3 -> 27
#          characters 5+1+5+1+3+2+3+1+1+3 = 25; words héllo wörld foo bar baz = 5; lines 3 "\n" + "baz" = 4
TEXT_COUNTS = {"bytes": 27, "chars": 25, "words": 5, "lines": 4}


def test_text_counts_by_hand():
    assert count_bytes(TEXT) == TEXT_COUNTS
    assert count_bytes(b"") == {"bytes": 0, "chars": 0, "words": 0, "lines": 0}
    assert count_bytes(b"a b\n") == {"bytes": 4, "chars": 4, "words": 2, "lines": 1}


def test_blocks_cut_anywhere_give_the_same_counts():
    for a in range(len(TEXT) + 1):
        for b in range(a, len(TEXT) + 1):
            c = TextCounter()
            for part in (TEXT[:a], TEXT[a:b], TEXT[b:]):  # cuts inside words and inside 2-byte characters
                c.add(count_block(part))
            assert c.result() == TEXT_COUNTS, (a, b)


def test_metrics_from_hand_computed_numbers():
    # 30 predicted tokens with a summed NLL of 60 nats, of a split of 31 tokens, 62 bytes, 40 chars, 10 words, 2 lines
    m = lm_metrics(60.0, 30, {"tokens": 31, "bytes": 62, "chars": 40, "words": 10, "lines": 2})
    assert m["loss"] == pytest.approx(2.0)
    assert m["bits_per_token"] == pytest.approx(2.885390081777927)  # 2 / ln 2
    assert m["token_ppl"] == m["ppl"] == pytest.approx(7.38905609893065)  # e^2
    assert m["bits_per_byte"] == pytest.approx(1.4426950408889634)  # 2.885 x 31 / 62
    assert m["bits_per_char"] == m["bpc"] == pytest.approx(2.236177313377893)  # 2.885 x 31 / 40
    assert m["word_ppl"] == pytest.approx(492.7490410932563)  # e^(2 x 31 / 10) = e^6.2
    assert m["word_eol_ppl"] == pytest.approx(175.32943091211476)  # e^(2 x 31 / 12) = e^5.1667
    assert m["tokens"] == 30 and m["split_tokens"] == 30 and m["evaluated_fraction"] == 1.0
    part = lm_metrics(20.0, 10, {"tokens": 31, "bytes": 62, "chars": 40, "words": 10, "lines": 2})
    assert part["evaluated_fraction"] == pytest.approx(1 / 3) and part["bits_per_byte"] == pytest.approx(1.4426950408889634)


def test_byte_level_per_byte_is_per_token_and_without_counts_only_per_token():
    m = lm_metrics(math.log(256) * 99, 99, {"tokens": 100, "bytes": 100, "chars": 100, "words": 7, "lines": 1})
    assert m["bits_per_byte"] == m["bits_per_token"] == m["bpc"] == pytest.approx(8.0)
    assert set(lm_metrics(1.0, 2)) == {"loss", "bits_per_token", "token_ppl", "ppl", "tokens"}


def test_raw_bytes_are_counted_per_split(tmp_path):
    from vqmoe_ds.training.data import load_corpus

    path = tmp_path / "c.txt"
    data = ("ünïcödé wörds and plain ones\n" * 80).encode("utf-8")
    path.write_bytes(data)
    corpus = load_corpus(data_file=str(path))
    n = len(data)
    n_valid = n_test = int(n * 0.05)
    start = n - n_valid - n_test
    for split, lo, hi in (("train", 0, start), ("valid", start, start + n_valid), ("test", start + n_valid, n)):
        assert corpus.split_counts(split) == {"tokens": hi - lo, **count_bytes(data[lo:hi])}


def test_preprocessing_records_the_counts_of_every_split(tmp_path):
    from vqmoe_ds.data import PreprocessConfig, TokenizerMeta, preprocess_corpus
    from vqmoe_ds.training.data import load_corpus

    rng = np.random.default_rng(0)
    words = ["the", "cät", "sat", "on", "a", "mat"]
    splits = {}
    for s, n in (("train", 400), ("valid", 60), ("test", 50)):
        lines = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(n)]
        (tmp_path / f"{s}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        splits[s] = str(tmp_path / f"{s}.txt")
    for tok in ("byte", "char", "word"):
        prefix = str(tmp_path / tok)
        preprocess_corpus(splits, prefix, PreprocessConfig(tokenizer=tok, block_bytes=64, progress=False))
        meta = TokenizerMeta.load(prefix + ".tokenizer.json")
        corpus = load_corpus(data_path=prefix)
        for s, path in splits.items():
            text = open(path, "rb").read()
            rec = meta.splits[s]
            assert {k: rec[k] for k in ("bytes", "chars", "words", "lines")} == count_bytes(text)
            assert rec["tokens"] == len(corpus.streams[s])
            expected = {"byte": rec["bytes"], "char": rec["chars"], "word": rec["words"] + rec["lines"]}[tok]
            assert rec["tokens"] == expected
        if tok == "word":  # a line end is a word-level token: word_eol_ppl is token_ppl
            m = lm_metrics(123.0, rec["tokens"] - 1, corpus.split_counts("test"))
            assert m["word_eol_ppl"] == pytest.approx(m["token_ppl"])


def test_results_json_has_every_validation_metric_of_the_best_step(tmp_path):
    from vqmoe_ds.training.loop import Trainer

    t = Trainer.__new__(Trainer)  # the loop's bookkeeping alone: no engine, evaluation and saving stubbed
    t.rank, t.step, t.best, t.best_valid, t.save_dir = 0, 0, math.inf, None, str(tmp_path / "ckpt")
    t.run = types.SimpleNamespace(eval_iters=0, test_iters=0, out_dir=str(tmp_path))
    t.task = types.SimpleNamespace(has_split=lambda s: True, metric="loss", higher_is_better=False,
                                   describe_eval=lambda s, r: "", results=lambda: {})
    t.log = types.SimpleNamespace(write=lambda r: None, info=lambda m: None)
    t.save = lambda tag, latest=True: None
    losses = iter([2.0, 1.5, 1.7])
    t.evaluate = lambda split, n: ({"loss": next(losses), "bpc": 9.0, "word_ppl": 3.0} if split == "valid"
                                   else {"loss": 1.0, "bpc": 1.5})
    for step in (10, 20, 30):
        t.step = step
        t.validate()
    t.test()
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["best_valid"] == {"loss": 1.5, "bpc": 9.0, "word_ppl": 3.0, "step": 20}
    assert res["test"]["bpc"] == 1.5 and res["steps"] == 30
