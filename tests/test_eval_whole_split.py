"""Evaluation covers the whole split: every token but the first (which has no context) is predicted exactly once,
the last partial window / row included, at world size 1 and 2, GPT and Transformer-XL; every rank runs the same
number of equally shaped batches; and the driver's summed NLL equals a reference computed token by token (GPT)
or row by row (Transformer-XL, whose memory makes a row one causal sequence) with the plain model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqmoe_ds.data import ArrayTokenStream
from vqmoe_ds.training.data import eval_batches
from vqmoe_ds.training.lm import LanguageModelling, command_line


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards, one at a time: one thread is ~20x faster than two fighting over a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unique_stream(n):
    return ArrayTokenStream(np.arange(n, dtype=np.int64), n)  # token i is i: a target names its position


@pytest.mark.parametrize("model", ["gpt", "txl"])
@pytest.mark.parametrize("n,batch,seq", [(205, 4, 16), (1001, 3, 7), (2, 4, 16), (64 * 4 + 1, 4, 16)])
@pytest.mark.parametrize("world", [1, 2])
def test_every_token_is_predicted_once(model, n, batch, seq, world):
    stream = unique_stream(n)
    targets, shapes = [], []
    for rank in range(world):
        batches = list(eval_batches(stream, model, batch, seq, rank, world))
        shapes.append([tuple(x.shape) for x, _, _ in batches])
        for x, y, mask in batches:
            assert x.shape == y.shape == mask.shape and mask.dtype == torch.bool
            assert x.shape[0] == batch and x.shape[1] <= seq
            targets += y[mask].tolist()
            # inputs are the targets' predecessors, padding is token 0 and never a target
            assert torch.equal(x[mask], y[mask] - 1)
            assert (x[~mask] == 0).all()
    assert all(s == shapes[0] for s in shapes)  # the same forwards on every rank
    assert sorted(targets) == list(range(1, n))  # every token but the first, once


@pytest.mark.parametrize("model", ["gpt", "txl"])
def test_max_batches_counts_that_many_batches(model):
    stream = unique_stream(1001)
    full = sum(int(m.sum()) for _, _, m in eval_batches(stream, model, 3, 7, 0, 1))
    part = list(eval_batches(stream, model, 3, 7, 0, 1, max_batches=2))
    assert len(part) == 2 and 0 < sum(int(m.sum()) for _, _, m in part) < full == 1000


def make_task(tmp_path, *flags, n_bytes=1400, eval_batch=4):  # test split: 70 bytes, 69 targets
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "\n"]
    text = " ".join(rng.choice(words, size=n_bytes)).encode("ascii")[:n_bytes]
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    parsed = command_line().parse(["--data-file", str(path), "--seq-length", "16", "--no-drop-tokens",
                                   "--micro-batch-size", "4", *flags])
    task = LanguageModelling.from_parsed(parsed)
    task.load()
    torch.manual_seed(0)
    task.shard(4, eval_batch)
    model = task.build_model().eval()
    return task, model


def driver_eval(task, model, world, split="test"):
    """The driver's ``evaluate`` on every rank of ``world`` in this process (ep 1: no collective), summed."""
    nll, tokens = 0.0, 0
    for rank in range(world):
        task.rank, task.world = rank, world
        with torch.no_grad():
            res = task.evaluate(model, split, 0)
        nll += res["loss"] * res["tokens"]
        tokens += res["tokens"]
    return nll, tokens


@pytest.mark.parametrize("world", [1, 2])
def test_driver_nll_equals_token_by_token_reference_gpt(tmp_path, world):
    task, model = make_task(tmp_path, eval_batch=1)  # 5 windows (4 x 16 + 5): at 2 ranks rank 1 runs a padding batch
    stream = task.corpus.streams["test"]
    toks = torch.from_numpy(stream.read(0, len(stream)))
    T = task.eval_len
    ref = 0.0
    with torch.no_grad():
        for p in range(1, len(toks)):  # target p, context from the start of its window k = (p - 1) // T
            start = (p - 1) // T * T
            logits, _, _, _ = model(toks[start:p][None])
            ref += F.cross_entropy(logits[0, -1].double(), toks[p]).item()
    nll, tokens = driver_eval(task, model, world)
    assert tokens == len(toks) - 1 == 69
    assert nll == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_driver_nll_equals_row_reference_txl(tmp_path, world):
    task, model = make_task(tmp_path, "--model", "txl", "--mem-len", "64", "--eval-seq-length", "8")
    stream = task.corpus.streams["test"]
    toks = torch.from_numpy(stream.read(0, len(stream)))
    n_pred, rows = len(toks) - 1, 4 * world
    L = math.ceil(n_pred / rows)  # the documented layout: row q predicts targets q*L+1 ... q*L+L
    ref = 0.0
    with torch.no_grad():
        for q in range(rows):
            length = max(0, min(L, n_pred - q * L))
            if length:  # memory over the row's segments = one causal pass over the row (mem_len >= L)
                logits, _, _, _ = model(toks[q * L:q * L + length][None])
                ref += F.cross_entropy(logits[0].double(), toks[q * L + 1:q * L + length + 1], reduction="sum").item()
    nll, tokens = driver_eval(task, model, world)
    assert tokens == n_pred == 69
    assert nll == pytest.approx(ref, rel=1e-5)
