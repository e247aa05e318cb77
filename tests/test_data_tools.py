"""The data tools a newcomer meets first: char level writes no stray one-token document; sentencepiece takes
user-defined symbols (WikiText's literal <unk> as one piece); a local corpus may have no valid or test part, and
the driver says which split is missing; --help keeps the examples' line continuations and shows defaults."""
import json
import math
import os
import types

import pytest
from tool_loader import load_tool

from vqmoe_ds.data import DataError, PreprocessConfig, preprocess_corpus
from vqmoe_ds.data.corpora import parse_ratios, prepare_local
from vqmoe_ds.data.token_stream import IndexedTokenStream


_tool = load_tool


@pytest.mark.parametrize("text", ["abcdefgh" * 8, "éàü" * 30 + "\n"])
def test_char_level_has_no_stray_document(tmp_path, text):
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    preprocess_corpus({"train": str(tmp_path / "train.txt")}, str(tmp_path / "c"),
                      PreprocessConfig(tokenizer="char", block_bytes=16, progress=False))
    s = IndexedTokenStream(str(tmp_path / "c.train"))
    lengths = [int(n) for n in s.starts[1:] - s.starts[:-1]]
    assert sum(lengths) == len(text)
    if text.isascii():  # 64 ASCII bytes in blocks of 16: four documents of 16, nothing left over
        assert lengths == [16, 16, 16, 16]
    else:  # blocks end on character boundaries, never one byte short of a full block
        assert all(n >= 7 for n in lengths[:-1]) and len(lengths) <= -(-len(text.encode()) // 14)


def test_user_defined_symbols_make_wikitext_unk_one_piece(tmp_path):
    import sentencepiece as spm

    train = tmp_path / "train.txt"
    train.write_text("".join(f"the {w} was <unk> in the year {i} .\n" for i in range(300) for w in ("cat", "dog")))
    tool = _tool("train_tokenizer")
    model = tool.train([str(train)], str(tmp_path / "sp"), 60, threads=1, user_defined_symbols=["<unk>"])
    sp = spm.SentencePieceProcessor(model_file=model)
    pieces = [sp.id_to_piece(i) for i in sp.encode("a <unk> b")]
    assert "<unk>" in pieces and sp.id_to_piece(0) == "<sp_unk>" and sp.unk_id() == 0
    with pytest.raises(DataError, match="cannot be a symbol"):
        tool.train([str(train)], str(tmp_path / "sp2"), 60, threads=1, user_defined_symbols=["</s>"])


def test_split_with_an_empty_part(tmp_path):
    assert parse_ratios("0.9,0.1,0") == (0.9, 0.1, 0.0)
    assert parse_ratios("0.8,0,0.2") == (0.8, 0.0, 0.2)
    for bad in ("0,0.5,0.5", "0.9,0.2,-0.1", "0.9,0.1"):
        with pytest.raises(DataError, match="train positive"):
            parse_ratios(bad)
    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"line {i} of the corpus\n" for i in range(200)))
    out = tmp_path / "data" / "mine"
    out.mkdir(parents=True)
    (out / "test.txt").write_text("stale\n")  # from an earlier split: removed, or preprocessing would read it
    written = prepare_local(str(src), str(out), (0.9, 0.1, 0.0))
    assert [os.path.basename(p) for p in written] == ["train.txt", "valid.txt"]
    assert not (out / "test.txt").exists()
    assert (out / "train.txt").read_bytes() + (out / "valid.txt").read_bytes() == src.read_bytes()
    written = prepare_local(str(src), str(out), (0.8, 0.0, 0.2))
    assert [os.path.basename(p) for p in written] == ["train.txt", "test.txt"]
    assert (out / "train.txt").read_bytes() + (out / "test.txt").read_bytes() == src.read_bytes()


def test_driver_names_the_missing_split(tmp_path):
    from vqmoe_ds.training.data import load_corpus
    from vqmoe_ds.training.loop import Trainer

    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"line {i} of the corpus\n" for i in range(400)))
    prepare_local(str(src), str(tmp_path / "d"), (0.9, 0.1, 0.0))
    prep = _tool("preprocess_data")
    assert prep.main(["--input", str(tmp_path / "d"), "--tokenizer", "byte", "--output-prefix",
                      str(tmp_path / "d" / "byte"), "--no-progress"]) == 0
    corpus = load_corpus(data_path=str(tmp_path / "d" / "byte"))
    assert sorted(corpus.streams) == ["train", "valid"]
    assert corpus.missing == {"test": f"{tmp_path}/d/byte.test.idx does not exist"}
    from vqmoe_ds.training.lm import LanguageModelling

    task = types.SimpleNamespace(corpus=corpus)
    assert LanguageModelling.has_split(task, "valid") and not LanguageModelling.has_split(task, "test")
    t = Trainer.__new__(Trainer)  # the loop's test step with no test split: a line, and "test": null
    lines = []
    t.rank, t.step, t.best, t.best_valid, t.save_dir = 0, 5, 1.25, None, str(tmp_path / "ckpt")
    t.run = types.SimpleNamespace(test_iters=0, out_dir=str(tmp_path / "run"))
    os.makedirs(t.run.out_dir)
    t.task = types.SimpleNamespace(has_split=lambda s: s != "test", metric="loss", results=lambda: {})
    t.log = types.SimpleNamespace(write=lambda r: None, info=lines.append)
    assert t.test() is None
    assert lines == ["no test split: results.json has no test results"]
    res = json.load(open(os.path.join(t.run.out_dir, "results.json")))
    assert res["test"] is None and res["best_valid"] == {"loss": 1.25} and math.isfinite(res["best_valid"]["loss"])


def test_help_keeps_line_continuations_and_shows_defaults(capsys):
    for name, expected in (("preprocess_data", ["--sp-model data/lm1b/sp32k.model \\\n        --output-prefix",
                                                "(default: 1048576)", "(default: 1)"]),
                           ("train_tokenizer", ["--model-prefix data/lm1b/sp32k \\\n        --vocab-size",
                                                "(default: bpe)", "--user-defined-symbols"]),
                           ("get_data", ["--data-dir DATA_DIR", "(default: data)", "(default: 0.9,0.05,0.05)"])):
        tool = _tool(name)
        with pytest.raises(SystemExit):
            (tool.parse_args if hasattr(tool, "parse_args") else tool.main)(["--help"])
        raw = capsys.readouterr().out
        flat = " ".join(raw.split())  # flag help is wrapped to the terminal's width
        for text in expected:  # a continuation as written in the description; a flag's text in its wrapped help
            assert text in (raw if "\\\n" in text else flat), (name, text)
        assert "(default: None)" not in flat and "(default: False)" not in flat


def test_preprocess_with_a_hugging_face_tokenizer(tmp_path):
    """--tokenizer hf: the .bin holds exactly the ids the `tokenizers` library gives for each block (one block per
    line group here: blocks of 64 bytes cut at line ends), the metadata records the kind and the text counts, and
    a missing --hf-tokenizer is one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    lines = ["the cat sat on a mat", "a dog ran", "the unknown cat", "on the mat the dog sat"] * 6
    text = "\n".join(lines) + "\n"
    (tmp_path / "train.txt").write_text(text)
    rc = _tool("preprocess_data").main(["--train", str(tmp_path / "train.txt"), "--tokenizer", "hf",
                                        "--hf-tokenizer", str(tmp_path / "tok"), "--output-prefix",
                                        str(tmp_path / "hf"), "--block-bytes", "64", "--workers", "1",
                                        "--no-progress"])
    assert rc == 0
    s = IndexedTokenStream(str(tmp_path / "hf.train"))
    got = [int(t) for t in s.read(0, len(s))]
    # the reference: the library itself on the same line-aligned blocks, concatenated
    blocks, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len((cur + line).encode()) > 64:
            blocks.append(cur)
            cur = ""
        cur += line
    blocks.append(cur)
    want = [i for b in blocks for i in tok.encode(b).ids]
    assert len(want) == sum(len(ln.split()) for ln in lines) and got == want
    assert 0 in got  # "unknown" is [UNK]
    meta = json.load(open(tmp_path / "hf.tokenizer.json"))
    assert meta["kind"] == "hf" and meta["vocab_size"] == 9
    with pytest.raises(DataError) as e:
        PreprocessConfig(tokenizer="hf")
    assert "--hf-tokenizer" in str(e.value) and "\n" not in str(e.value)
