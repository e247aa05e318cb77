"""LMDataset windows, LMBatches resume, Transformer-XL segments: contents against the raw token stream."""
import numpy as np
import pytest
import torch

from vqmoe_ds.data import DataError
from vqmoe_ds.data.lm_dataset import LMBatches, LMDataset
from vqmoe_ds.data.loading import build_lm_dataset, build_segments, text_stream
from vqmoe_ds.data.preprocess import PreprocessConfig, preprocess_corpus
from vqmoe_ds.data.segments import OrderedSegments
from vqmoe_ds.data.token_stream import ArrayTokenStream, IndexedTokenStream
from vqmoe_ds.data.tokenizers import ByteTokenizer

TOKENS = np.arange(1000) * 7 % 256  # distinct enough that a wrong offset shows


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The same 1000 bytes as TOKENS, preprocessed into many small sequences (blocks of 37 bytes)."""
    d = tmp_path_factory.mktemp("idx")
    (d / "train.txt").write_bytes(bytes(TOKENS.astype(np.uint8)))
    # byte data with NULs is not text: write through the library instead of the CLI check
    from vqmoe_ds.data.preprocess import tokenize_file
    n = tokenize_file(str(d / "train.txt"), ByteTokenizer(), str(d / "b.train"), "uint8", block_bytes=37, progress=False)
    assert n == 1000
    return str(d / "b.train")


def test_indexed_stream_reads_across_sequences(indexed):
    s = IndexedTokenStream(indexed)
    assert len(s) == 1000 and s.num_sequences == 28  # ceil(1000 / 37)
    for start, length in [(0, 1000), (36, 2), (37, 37), (5, 300), (999, 1), (400, 0)]:
        assert s.read(start, length).tolist() == TOKENS[start:start + length].tolist()
    with pytest.raises(IndexError):
        s.read(990, 11)


@pytest.mark.parametrize("make", ["array", "indexed"])
def test_windows_are_shifted_slices_of_the_stream(indexed, make):
    stream = ArrayTokenStream(TOKENS) if make == "array" else IndexedTokenStream(indexed)
    ds = LMDataset(stream, seq_len=64, shuffle=False)
    assert ds.num_samples == 999 // 64 == len(ds)
    for j in range(len(ds)):
        x, y = ds[j]
        assert x.dtype == torch.int64 and x.shape == (64,)
        assert x.tolist() == TOKENS[j * 64:j * 64 + 64].tolist()
        assert y.tolist() == TOKENS[j * 64 + 1:j * 64 + 65].tolist()


def test_ranks_are_disjoint_and_cover_each_epoch():
    stream = ArrayTokenStream(TOKENS)
    n = (len(TOKENS) - 1) // 10  # 99 samples
    for world in (1, 2, 4):
        ranks = [LMDataset(stream, 10, seed=3, rank=r, world_size=world) for r in range(world)]
        ids = [[d.sample_id(j) for j in range(len(d))] for d in ranks]
        assert all(len(i) == n // world for i in ids)
        flat = sum(ids, [])
        assert len(set(flat)) == len(flat)  # disjoint
        assert sorted(flat) == sorted(ranks[0].order()[:world * (n // world)].tolist())  # cover all but the tail
        if world == 1:
            assert sorted(flat) == list(range(n))
        x, _ = ranks[-1][0]
        k = ids[-1][0]
        assert x.tolist() == TOKENS[k * 10:k * 10 + 10].tolist()


def test_order_is_seeded_per_epoch():
    stream = ArrayTokenStream(TOKENS)
    a, b, c = (LMDataset(stream, 10, seed=s) for s in (1, 1, 2))
    assert (a.order(0) == b.order(0)).all()
    assert not (a.order(0) == c.order(0)).all()
    assert not (a.order(0) == a.order(1)).all()
    assert sorted(a.order(1)) == list(range(99))


def test_batches_resume_exactly():
    ds = LMDataset(ArrayTokenStream(TOKENS), 10, seed=5, rank=1, world_size=2)  # 49 samples on this rank
    it = LMBatches(ds, batch_size=8)  # 6 batches per epoch, 1 sample dropped
    seen = [next(it) for _ in range(9)]
    assert it.state_dict() == {"epoch": 1, "index": 24}
    # a fresh iterator resumed from step 4's state gives the same following batches
    ds2 = LMDataset(ArrayTokenStream(TOKENS), 10, seed=5, rank=1, world_size=2)
    it2 = LMBatches(ds2, batch_size=8)
    it2.load_state_dict({"epoch": 0, "index": 32})
    for want in seen[4:]:
        got = next(it2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x, y = seen[0]
    assert x.shape == (8, 10) and torch.equal(x[:, 1:], y[:, :-1])
    ds.set_epoch(0)
    first = [ds.sample_id(j) for j in range(8)]
    assert x[:, 0].tolist() == [int(TOKENS[k * 10]) for k in first]
    # epoch 1 uses another order
    assert not torch.equal(seen[6][0], seen[0][0])
    with pytest.raises(DataError, match="outside the dataset"):
        it2.load_state_dict({"epoch": 0, "index": 50})


def test_segments_follow_parallel_streams_in_order(indexed):
    stream = IndexedTokenStream(indexed)
    seg = OrderedSegments(stream, batch_size=3, tgt_len=50)
    piece = 1000 // 3  # 333 tokens per row; segments of 50, the last 332 - 300 = 32 long
    assert seg.piece_len == piece and len(seg) == 7
    got = list(seg)
    assert [s[0].shape for s in got] == [(3, 50)] * 6 + [(3, 32)]
    for b in range(3):
        row_in = torch.cat([s[0][b] for s in got]).tolist()
        row_tg = torch.cat([s[1][b] for s in got]).tolist()
        assert row_in == TOKENS[b * piece:b * piece + piece - 1].tolist()  # each row continues its stream
        assert row_tg == TOKENS[b * piece + 1:b * piece + piece].tolist()


def test_segments_sharded_and_resumable():
    stream = ArrayTokenStream(TOKENS)
    world, B = 2, 2
    segs = [OrderedSegments(stream, B, 40, rank=r, world_size=world) for r in range(world)]
    assert len(segs[0]) == len(segs[1])
    piece = 1000 // (world * B)
    rows = {}
    for r, s in enumerate(segs):
        parts = list(s)
        for b in range(B):
            rows[r * B + b] = torch.cat([p[0][b] for p in parts]).tolist()
    for g in range(world * B):  # rank r row b is global piece r*B+b: disjoint, in order, covering
        assert rows[g] == TOKENS[g * piece:g * piece + piece - 1].tolist()
    resumed = OrderedSegments(stream, B, 40, rank=1, world_size=world, start_index=3)
    again = list(OrderedSegments(stream, B, 40, rank=1, world_size=world))
    for want, got in zip(again[3:], resumed):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert resumed.state_dict() == {"index": len(again)}


def test_too_small_corpus_errors():
    stream = ArrayTokenStream(np.arange(50) % 256)
    with pytest.raises(DataError, match="too few for 1 sample"):
        LMDataset(stream, seq_len=50)
    LMDataset(stream, seq_len=49)
    with pytest.raises(DataError, match="too few"):
        OrderedSegments(stream, batch_size=30, tgt_len=8)
    with pytest.raises(DataError, match="fewer than one batch"):
        LMBatches(LMDataset(stream, seq_len=10), batch_size=5)


def test_build_from_data_path_checks_vocab(tmp_path):
    (tmp_path / "train.txt").write_text("some text for the model\n" * 20)
    preprocess_corpus({"train": str(tmp_path / "train.txt")}, str(tmp_path / "c"),
                      PreprocessConfig(tokenizer="char", progress=False))
    ds = build_lm_dataset(str(tmp_path / "c"), "train", seq_len=16, model_vocab_size=64)
    alphabet = sorted(set("some text for the model\n"))
    x, _ = LMDataset(ds.stream, 16, shuffle=False)[0]
    assert "".join(alphabet[i] for i in x.tolist()) == ("some text for the model\n" * 2)[:16]
    with pytest.raises(DataError, match=f"has {len(alphabet)} tokens but the model's vocab_size is 8"):
        build_lm_dataset(str(tmp_path / "c"), "train", seq_len=16, model_vocab_size=8)
    segs = build_segments(str(tmp_path / "c"), "train", batch_size=2, tgt_len=16, model_vocab_size=64)
    assert next(iter(segs))[0].shape == (2, 16)
    with pytest.raises(DataError, match=r"c\.valid\.idx does not exist"):
        build_lm_dataset(str(tmp_path / "c"), "valid", seq_len=16)


def test_in_memory_path():
    s = text_stream("héllo", ByteTokenizer())
    assert s.read(0, len(s)).tolist() == list("héllo".encode())
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        ArrayTokenStream(np.array([3, 12]), vocab_size=10)
