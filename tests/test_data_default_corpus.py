"""The synthetic demo corpus: deterministic, exact size, sources really differ, spans label every byte."""
import collections
import importlib.util
import json
import os
import re

import pytest

from vqmoe_ds.data import DataError
from vqmoe_ds.data.default_corpus import SOURCES, generate, generate_documents
from vqmoe_ds.data.token_stream import IndexedTokenStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_deterministic_and_exact_size():
    a = generate(20_000, seed=7)
    assert a == generate(20_000, seed=7)
    assert a != generate(20_000, seed=8)
    assert len(a) == len(a.encode("ascii")) == 20_000
    assert generate(5_000, seed=7) == a[:5_000]  # a prefix: the size only decides where generation stops
    with pytest.raises(DataError):
        generate(0)


def test_spans_tile_the_text_and_sources_differ():
    text, spans = generate_documents(60_000, seed=1)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert set(s for _, _, s in spans) == set(SOURCES)
    chars = collections.defaultdict(set)
    for a, b, s in spans:
        doc = text[a:b]
        chars[s].update(doc)
        lines = [ln for ln in doc.split("\n") if ln]
        if s == "arithmetic":
            for ln in lines[:-1] if b == len(text) else lines:  # the very last doc may be cut short
                m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", ln)
                x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
                assert z == {"+": x + y, "-": x - y, "*": x * y}[op]  # the equations are true
        elif s == "english":
            assert all(ln.endswith(" .") for ln in (lines[:-1] if b == len(text) else lines))
    assert chars["dna"] <= set("ACGT\n")
    assert chars["arithmetic"] <= set("0123456789+-*= \n")
    assert not chars["english"] & set("0123456789:=()")
    assert {"(", ")", ":"} <= chars["code"]
    assert ":" in chars["dictionary"] and not chars["dictionary"] & set("()=")


def test_tool_writes_splits_spans_and_byte_data(tmp_path):
    spec = importlib.util.spec_from_file_location("_mdc", os.path.join(ROOT, "tools", "make_default_corpus.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "default"
    assert tool.main(["--out-dir", str(out), "--num-bytes", "40000", "--seed", "2", "--preprocess"]) == 0
    sizes = [os.path.getsize(out / f"{s}.txt") for s in ("train", "valid", "test")]
    assert sizes == [36000, 2000, 2000]
    assert (out / "train.txt").read_text() == generate(36000, seed=6)  # split i uses seed*3+i
    spans = json.loads((out / "sources.json").read_text())
    assert spans["sources"] == list(SOURCES) and spans["valid"][-1][1] == 2000
    s = IndexedTokenStream(str(out / "byte.valid"))
    assert bytes(s.read(0, len(s)).tolist()) == (out / "valid.txt").read_bytes()
    assert json.loads((out / "byte.tokenizer.json").read_text())["vocab_size"] == 256
