"""Transformer-XL: the relative shift, segment memory equal to full-sequence attention, causality."""
import torch

from vqmoe_ds.models import build_model, named_config, rel_shift


def tiny_txl(mem_len, router="topk", **kw):
    torch.manual_seed(0)
    moe = {"router": router, "num_experts": 4, "top_k": 2, "drop_tokens": False}  # dropless: per-token routing
    if router in ("vq", "vqmoe"):
        moe["codebook_size"] = 8
    cfg = named_config("tiny", model="txl", mem_len=mem_len, seq_len=8, moe=moe, **kw)
    return build_model(cfg).eval()


def test_rel_shift_lines_up_distances():
    # scores against distances (K-1, ..., 0): x[i, c] is the score of distance K-1-c.  After the shift,
    # entry (i, j) must hold the score of distance i + (K - Q) - j for every visible key j.
    B, H, Q, K = 2, 3, 5, 9
    dist_of_col = torch.arange(K - 1, -1, -1).float()
    x = (torch.arange(Q).float()[:, None] * 100 + dist_of_col[None, :]).expand(B, H, Q, K).contiguous()
    out = rel_shift(x)
    for i in range(Q):
        for j in range(i + K - Q + 1):
            assert out[0, 0, i, j].item() == i * 100 + (i + K - Q - j), (i, j)


def test_segment_with_memory_equals_full_sequence():
    # 3 segments of 8 tokens; with mem_len >= everything seen, segment s attends to exactly the tokens the
    # full 24-token causal pass attends to, at every layer: logits must agree.
    for router in ("topk", "vqmoe", "dense"):
        model = tiny_txl(mem_len=16, router=router)
        idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full, _, _, _ = model(idx)
            mems, segs = None, []
            for s in range(3):
                logits, _, _, mems = model(idx[:, 8 * s:8 * s + 8], mems=mems)
                segs.append(logits)
                assert mems[0].shape == (2, min(16, 8 * (s + 1)), 64)
        assert (full[:, :16] - torch.cat(segs[:2], 1)).abs().max() < 1e-4, router
        # segment 3 sees 16 tokens of memory = all of the past (16 positions back): equal too
        assert (full[:, 16:] - segs[2]).abs().max() < 1e-4, router


def test_memory_window_limits_context():
    # mem_len=8 < 16 tokens of history: segment 3 no longer sees tokens 0..7 at layer 0, so its logits must
    # differ from the full pass -- and must not depend on tokens it cannot see through any layer.
    model = tiny_txl(mem_len=8)
    idx = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _, _, _ = model(idx)
        mems = None
        for s in range(3):
            logits, _, _, mems = model(idx[:, 8 * s:8 * s + 8], mems=mems)
    assert (full[:, 16:] - logits).abs().max() > 1e-3
    # with memory of segment 2 only, segment 3 equals a pass over tokens 8..23 at its last 8 positions
    # (2 layers: segment 2's memory states were computed with segment 1 in memory, so compare at layer count 1)
    model1 = tiny_txl(mem_len=8, n_layer=1)
    with torch.no_grad():
        win, _, _, _ = model1(idx[:, 8:])
        mems = None
        for s in range(3):
            logits, _, _, mems = model1(idx[:, 8 * s:8 * s + 8], mems=mems)
    assert (win[:, 8:] - logits).abs().max() < 1e-4


def test_memory_carries_information_and_future_does_not_leak():
    model = tiny_txl(mem_len=8)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 256, (1, 8), generator=g), torch.randint(0, 256, (1, 8), generator=g)
    nxt = torch.randint(0, 256, (1, 8), generator=g)
    with torch.no_grad():
        _, _, _, mems_a = model(a)
        _, _, _, mems_b = model(b)
        la, _, _, _ = model(nxt, mems=mems_a)
        lb, _, _, _ = model(nxt, mems=mems_b)
        assert (la - lb).abs().max() > 1e-3  # the previous segment matters through memory
        changed = nxt.clone()
        changed[0, 5] = (changed[0, 5] + 1) % 256
        lc, _, _, _ = model(changed, mems=mems_a)
    assert (lc[:, :5] - la[:, :5]).abs().max() < 1e-5  # a future token cannot change a past logit (fp noise only)
    assert (lc[:, 5:] - la[:, 5:]).abs().max() > 1e-3


def test_memory_is_detached_and_loss_backpropagates():
    model = tiny_txl(mem_len=8).train()
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    _, loss, aux, mems = model(idx[:, :8], idx[:, 1:])
    assert all(not m.requires_grad for m in mems)
    (loss + aux).backward()
    assert model.blocks[0].attn.u.grad is not None and model.blocks[0].attn.u.grad.abs().sum() > 0
    assert abs(loss.item() - torch.nn.functional.cross_entropy(
        model(idx[:, :8])[0].flatten(0, 1), idx[:, 1:].flatten()).item()) < 1e-5
