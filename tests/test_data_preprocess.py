"""Tokenizers and tools/preprocess_data.py: round trips, hand-counted vocabularies, .bin/.idx read back, bad input."""
import json
import shutil

import numpy as np
import pytest
from tool_loader import load_tool

from vqmoe_ds.data import DataError, TokenizerMeta, check_vocab, choose_dtype
from vqmoe_ds.data.loading import load_split
from vqmoe_ds.data.preprocess import PreprocessConfig, iter_blocks, preprocess_corpus
from vqmoe_ds.data.token_stream import IndexedTokenStream
from vqmoe_ds.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer


_tool = load_tool


preprocess_tool = _tool("preprocess_data")
train_tokenizer = _tool("train_tokenizer")

# Multi-byte characters, CRLF, a blank line, no final newline: everything a byte/char round trip must keep.
TEXT = "Première ligne — avec accents\r\nzweite Zeile: größer\n\n日本語のテキスト\nlast line"


def _splits(tmp_path, train, valid=None, test=None):
    out = {}
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            p = tmp_path / f"{name}.txt"
            p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
            out[name] = str(p)
    return out


@pytest.mark.parametrize("kind", ["byte", "char"])
@pytest.mark.parametrize("workers", [1, 2])
def test_byte_and_char_round_trip(tmp_path, kind, workers):
    splits = _splits(tmp_path, TEXT * 40, valid=TEXT[::-1], test="ligne\n")
    # tiny blocks so that many cuts fall inside multi-byte characters and CRLFs
    meta = preprocess_corpus(splits, str(tmp_path / "out" / kind),
                             PreprocessConfig(tokenizer=kind, workers=workers, block_bytes=17, progress=False))
    tok = Tokenizer.from_metadata(TokenizerMeta.load(str(tmp_path / "out" / f"{kind}.tokenizer.json")))
    for name, path in splits.items():
        raw = open(path, "rb").read()
        stream = IndexedTokenStream(str(tmp_path / "out" / f"{kind}.{name}"))
        ids = stream.read(0, len(stream))
        assert tok.decode(ids) == raw.decode("utf-8")
        if kind == "byte":
            assert ids.tolist() == list(raw)
        else:
            assert len(ids) == len(raw.decode("utf-8"))
    assert meta.dtype == "uint8"
    if kind == "char":
        assert meta.vocab_size == len(set(TEXT))
        assert tok.encode("li") == [tok.chars.index("l"), tok.chars.index("i")]


def test_blocks_cover_the_file_and_respect_cuts(tmp_path):
    p = tmp_path / "t.txt"
    data = TEXT.encode() * 3
    p.write_bytes(data)
    for cut in ("any", "utf8", "line"):
        blocks = list(iter_blocks(str(p), 7, cut))
        assert b"".join(b for _, b in blocks) == data
        assert [o for o, _ in blocks] == list(np.cumsum([0] + [len(b) for _, b in blocks[:-1]]))
        for _, b in blocks[:-1]:
            if cut == "utf8":
                b.decode("utf-8")  # never cut inside a character
            if cut == "line":
                assert b.endswith(b"\n")


def test_word_vocab_min_count_and_unk_by_hand(tmp_path):
    train = "the cat sat\nthe dog sat\n\nthe cat ran\n"
    # counts: the 3, cat 2, sat 2, dog 1, ran 1 -> min_count 2 keeps the, cat, sat (ties by code point)
    valid = "the bird sat\n"
    splits = _splits(tmp_path, train, valid)
    meta = preprocess_corpus(splits, str(tmp_path / "w"), PreprocessConfig(tokenizer="word", min_count=2, progress=False))
    assert open(tmp_path / "w.vocab.txt").read().split("\n")[:-1] == ["<eos>", "<unk>", "the", "cat", "sat"]
    assert (meta.vocab_size, meta.eos_id, meta.unk_id, meta.dtype) == (5, 0, 1, "uint8")
    tr = IndexedTokenStream(str(tmp_path / "w.train"))
    assert tr.read(0, len(tr)).tolist() == [2, 3, 4, 0, 2, 1, 4, 0, 0, 2, 3, 1, 0]
    assert tr.num_sequences == 4  # one sequence per line, the blank line is a lone <eos>
    va = IndexedTokenStream(str(tmp_path / "w.valid"))
    assert va.read(0, len(va)).tolist() == [2, 1, 4, 0]  # "bird" is not in the train vocabulary
    tok = Tokenizer.from_metadata(TokenizerMeta.load(str(tmp_path / "w.tokenizer.json")))
    assert tok.decode(va.read(0, len(va))) == "the <unk> sat\n"
    # min_count 1: every train word, most frequent first
    assert WordTokenizer.build(__import__("collections").Counter(train.split())).words == \
        ["<eos>", "<unk>", "the", "cat", "sat", "dog", "ran"]


def test_word_round_trip_modulo_whitespace(tmp_path):
    text = "  a  b\tc \r\nd e\n\nf\n"
    splits = _splits(tmp_path, text)
    preprocess_corpus(splits, str(tmp_path / "w"), PreprocessConfig(tokenizer="word", workers=2, block_bytes=16,
                                                                     progress=False))
    tok = Tokenizer.from_metadata(TokenizerMeta.load(str(tmp_path / "w.tokenizer.json")))
    s = IndexedTokenStream(str(tmp_path / "w.train"))
    assert tok.decode(s.read(0, len(s))) == "a b c\nd e\n\nf\n"
    assert tok.encode("a b\nf") == [tok.index["a"], tok.index["b"], 0, tok.index["f"], 0]


def test_workers_give_identical_files(tmp_path):
    text = "".join(f"line {i} of the corpus with word{i % 7}\n" for i in range(400))
    splits = _splits(tmp_path, text)
    for w in (1, 2):
        preprocess_corpus(splits, str(tmp_path / f"w{w}"), PreprocessConfig(tokenizer="word", workers=w,
                                                                            block_bytes=256, progress=False))
    for ext in (".train.bin", ".train.idx", ".vocab.txt"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_sentencepiece_train_and_encode(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    rng = np.random.default_rng(0)
    train = "".join(" ".join(rng.choice(words, 6)) + "\n" for _ in range(300))
    splits = _splits(tmp_path, train, valid="alpha beta\ngamma\n")
    model = train_tokenizer.train([splits["train"]], str(tmp_path / "sp"), vocab_size=40, model_type="bpe")
    meta = preprocess_corpus(splits, str(tmp_path / "sp"), PreprocessConfig(tokenizer="sentencepiece", sp_model=model,
                                                                           workers=2, progress=False))
    assert (meta.vocab_size, meta.eos_id, meta.unk_id, meta.bos_id, meta.add_eos) == (40, 2, 0, 1, True)
    tok = Tokenizer.from_metadata(TokenizerMeta.load(str(tmp_path / "sp.tokenizer.json")))
    va = IndexedTokenStream(str(tmp_path / "sp.valid"))
    ids = va.read(0, len(va))
    assert ids.tolist() == tok.encode("alpha beta\ngamma\n")
    assert (ids == 2).sum() == 2 and ids[-1] == 2  # one </s> per line
    assert tok.decode(ids) == "alpha beta\ngamma\n"
    tr = IndexedTokenStream(str(tmp_path / "sp.train"))
    assert tok.decode(tr.read(0, len(tr))) == train


def test_sentencepiece_vocab_too_large(tmp_path):
    splits = _splits(tmp_path, "a b c\n" * 5)
    with pytest.raises(DataError, match="lower --vocab-size"):
        train_tokenizer.train([splits["train"]], str(tmp_path / "sp"), vocab_size=5000)


def test_cli_writes_layout_and_metadata(tmp_path, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    for s, t in (("train", "x y z\nx y\n"), ("valid", "x z\n"), ("test", "y\n")):
        (d / f"{s}.txt").write_text(t)
    prefix = tmp_path / "out" / "word"
    assert preprocess_tool.main(["--input", str(d), "--tokenizer", "word", "--output-prefix", str(prefix),
                                 "--workers", "1", "--no-progress"]) == 0
    for s in ("train", "valid", "test"):
        assert (tmp_path / "out" / f"word.{s}.bin").exists() and (tmp_path / "out" / f"word.{s}.idx").exists()
    meta = json.loads((tmp_path / "out" / "word.tokenizer.json").read_text())
    assert meta["kind"] == "word" and meta["vocab_size"] == 5 and meta["vocab_file"] == "word.vocab.txt"
    # the folder can be moved: the vocabulary path is relative to the JSON
    shutil.move(str(tmp_path / "out"), str(tmp_path / "moved"))
    stream, m = load_split(str(tmp_path / "moved" / "word"), "test", model_vocab_size=5)
    assert Tokenizer.from_metadata(m).decode(stream.read(0, len(stream))) == "y\n"


def test_check_vocab():
    meta = TokenizerMeta(kind="word", vocab_size=1000, dtype="uint16")
    check_vocab(meta, 1000)
    check_vocab(meta, 1024)  # padded embedding table
    with pytest.raises(DataError, match="--vocab-size 1000"):
        check_vocab(meta, 999)
    with pytest.raises(DataError, match="vocab_size is 1024"):
        check_vocab(meta, 1024, allow_padding=False)


def test_dtype_choice_and_overflow(tmp_path):
    assert [choose_dtype(n) for n in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "int32"]
    splits = _splits(tmp_path, " ".join(f"w{i}" for i in range(300)) + "\n")
    with pytest.raises(DataError, match="does not fit --dtype uint8"):
        preprocess_corpus(splits, str(tmp_path / "w"), PreprocessConfig(tokenizer="word", dtype="uint8", progress=False))


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), (b"", "is empty"),
                                            (b"abc\x00\x00def\n", "not text"), (b"ok\n\xff\xfe bad\n", "not UTF-8")])
def test_bad_text_inputs(tmp_path, content, needle):
    p = tmp_path / "train.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=needle) as e:
        preprocess_corpus({"train": str(p)}, str(tmp_path / "o"), PreprocessConfig(tokenizer="char", progress=False))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_deep_in_file_names_offset(tmp_path):
    p = tmp_path / "train.txt"
    p.write_bytes(b"good line\n" * 10000 + b"bad \xff byte\n")  # past the 64 KiB sniff window
    with pytest.raises(DataError, match=r"offset 100004"):
        preprocess_corpus({"train": str(p)}, str(tmp_path / "o"), PreprocessConfig(tokenizer="word", progress=False))
    assert not (tmp_path / "o.train.bin").exists()  # no half-written output left behind


def test_char_unknown_in_valid(tmp_path):
    splits = _splits(tmp_path, "abc abc\n", valid="abd\n")
    with pytest.raises(DataError, match="'d' of the valid split are not in the train alphabet"):
        preprocess_corpus(splits, str(tmp_path / "c"), PreprocessConfig(tokenizer="char", progress=False))
    assert not (tmp_path / "c.train.bin").exists()  # refused before anything was written
    with pytest.raises(DataError, match="'d' is not in the training alphabet"):
        CharTokenizer(" abc").encode("abd")


def test_idx_without_bin_and_size_mismatch(tmp_path):
    splits = _splits(tmp_path, "hello world\n" * 10)
    preprocess_corpus(splits, str(tmp_path / "b"), PreprocessConfig(tokenizer="byte", progress=False))
    binf = tmp_path / "b.train.bin"
    data = binf.read_bytes()
    binf.write_bytes(data[:-3])
    with pytest.raises(DataError, match=r"has 117 bytes but .* describes 120"):
        IndexedTokenStream(str(tmp_path / "b.train"))
    binf.unlink()
    with pytest.raises(DataError, match="b.train.bin is missing"):
        IndexedTokenStream(str(tmp_path / "b.train"))
    with pytest.raises(DataError, match="nothing.idx does not exist"):
        IndexedTokenStream(str(tmp_path / "nothing"))
    (tmp_path / "junk.idx").write_bytes(b"not an index at all")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(DataError, match="not a valid megatron-core index"):
        IndexedTokenStream(str(tmp_path / "junk"))


def test_missing_metadata_and_missing_train_for_vocab(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json does not exist"):
        load_split(str(tmp_path / "none"), "train")
    splits = _splits(tmp_path, "a\n", valid="a\n")
    del splits["train"]
    with pytest.raises(DataError, match="no train file"):
        preprocess_corpus(splits, str(tmp_path / "w"), PreprocessConfig(tokenizer="word", progress=False))


def test_byte_tokenizer_basics():
    t = ByteTokenizer()
    assert t.encode("é") == [0xC3, 0xA9] and t.decode([0xC3, 0xA9]) == "é" and t.vocab_size == 256
    c = CharTokenizer.build(["hello"])
    assert c.chars == "ehlo" and c.encode("hole") == [1, 3, 2, 0]
