"""Codebook quantizer (L2 / cosine / low-dim), EMA, k-means init, dead-code restart, residual VQ, LFQ."""
import torch

from vqmoe_ds.quantizers import CodebookQuantizer, LFQQuantizer, ResidualQuantizer


def brute_force_codes(x, W_in, b_in, codebook, distance):
    """Nearest code of every token from the raw tensors: the projection's weights (None: no projection), the
    codebook, and the distance written out (cosine: dot product of the two normalised vectors)."""
    out = []
    for row in x.detach().double():
        z = row if W_in is None else W_in.detach().double() @ row + b_in.detach().double()
        scores = []
        for c in codebook.detach().double():
            if distance == "cosine":
                scores.append(-float((z @ c) / (z.norm() * c.norm())))
            else:
                scores.append(float(((z - c) ** 2).sum()))
        out.append(min(range(len(scores)), key=lambda j: (scores[j], j)))
    return out


def test_nearest_code_l2_and_cosine_match_brute_force():
    torch.manual_seed(0)
    for distance in ("l2", "cosine"):
        for codebook_dim in (None, 5):
            q = CodebookQuantizer(8, 13, codebook_dim=codebook_dim, distance=distance).eval()
            x = torch.randn(64, 8)
            W, b = (q.in_proj.weight, q.in_proj.bias) if codebook_dim else (None, None)
            assert q(x).codes_T.tolist() == brute_force_codes(x, W, b, q.codebook, distance)


def test_cosine_codes_come_back_at_the_token_scale():
    """The default discrete path (cosine codebook in the model dim): x~ = |x| v, so it has the token's norm
    (not 1) and points along its code; its gradient is straight-through for the direction and exact for the norm:
    dL/dx = g + x/|x| ((v - x/|x|) . g) for an upstream gradient g."""
    torch.manual_seed(0)
    q = CodebookQuantizer(256, 16, distance="cosine").eval()
    x = (torch.randn(40, 256) * 1.0).requires_grad_(True)  # |x| ~ 16, as after a LayerNorm at d = 256
    out = q(x)
    norms = x.detach().norm(dim=1)
    assert torch.allclose(out.quantized_TD.norm(dim=1), norms, rtol=1e-5)
    unit_codes = q.codebook.detach() / q.codebook.detach().norm(dim=1, keepdim=True)
    assert torch.allclose(out.quantized_TD.detach() / norms[:, None], unit_codes[out.codes_T], atol=1e-5)
    g = torch.randn(40, 256)
    (out.quantized_TD * g).sum().backward()
    z = x.detach() / norms[:, None]
    v = unit_codes[out.codes_T]
    assert torch.allclose(x.grad, g + z * ((v - z) * g).sum(1, keepdim=True), atol=1e-5)
    code = CodebookQuantizer(256, 16, distance="cosine", scale="code").eval()
    code.load_state_dict(q.state_dict())
    assert torch.allclose(code(x).quantized_TD.norm(dim=1), torch.ones(40), atol=1e-5)  # the unit code
    low = CodebookQuantizer(256, 16, codebook_dim=8, distance="cosine").eval()  # factorised: out_proj's scale
    assert not torch.allclose(low(x).quantized_TD.norm(dim=1), torch.ones(40), atol=1e-2)


def test_straight_through_value_and_gradient():
    torch.manual_seed(0)
    q = CodebookQuantizer(6, 5, distance="l2").eval()
    x = torch.randn(10, 6, requires_grad=True)
    out = q(x)
    assert torch.allclose(out.quantized_TD, q.codebook[out.codes_T])  # value: the code
    g = torch.randn(10, 6)
    (out.quantized_TD * g).sum().backward()
    assert torch.allclose(x.grad, g)  # gradient: identity to x


def test_vq_loss_terms_and_their_gradients():
    """loss = ||sg[z]-v||^2 + beta ||z-sg[v]||^2: the codebook gets grad 2(v-z)/n, the input 2 beta (z-v)/n."""
    torch.manual_seed(0)
    q = CodebookQuantizer(4, 3, distance="l2", beta=0.25).eval()
    x = torch.randn(5, 4, requires_grad=True)
    out = q(x)
    v = q.codebook[out.codes_T].detach()
    n = x.numel()
    assert torch.allclose(out.loss, 1.25 * ((v - x.detach()) ** 2).sum() / n)
    out.loss.backward()
    assert torch.allclose(x.grad, 2 * 0.25 * (x.detach() - v) / n, atol=1e-7)
    expected = torch.zeros(3, 4).index_add_(0, out.codes_T, 2 * (v - x.detach()) / n)
    assert torch.allclose(q.codebook.grad, expected, atol=1e-7)


def test_low_dim_cosine_projection_shapes_and_unit_codes():
    q = CodebookQuantizer(32, 16, codebook_dim=4, distance="cosine").eval()
    out = q(torch.randn(20, 32))
    assert out.quantized_TD.shape == (20, 32)
    z_q = q.codes_KC()[out.codes_T]
    assert torch.allclose(z_q.norm(dim=1), torch.ones(20), atol=1e-6)
    assert torch.allclose(out.quantized_TD, q.out_proj(z_q), atol=1e-6)


def test_ema_update_by_hand():
    torch.manual_seed(0)
    q = CodebookQuantizer(3, 2, distance="l2", ema=True, ema_decay=0.5, eps=0.0).train()
    assert not q.codebook.requires_grad
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0, 0], [10.0, 10, 10]]))
        q.cluster_size_K.fill_(1.0)
        q.embed_sum_KC.copy_(q.codebook)
    x = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [9.0, 9, 9]])
    q(x)
    # counts [2, 1]; cluster = 0.5*1 + 0.5*[2,1] = [1.5, 1]; sums = 0.5*old + 0.5*[[1,1,0],[9,9,9]]
    cs = torch.tensor([1.5, 1.0])
    es = torch.tensor([[0.5, 0.5, 0.0], [9.5, 9.5, 9.5]])
    assert torch.allclose(q.cluster_size_K, cs)
    assert torch.allclose(q.codebook, es / cs.unsqueeze(1))


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[10.0, 0], [0, 10.0], [-10.0, -10.0]])
    x = torch.cat([c + 0.1 * torch.randn(40, 2) for c in centers])
    q = CodebookQuantizer(2, 3, distance="l2", kmeans_init=True, kmeans_iters=10).train()
    out = q(x)
    assert bool(q.initted)
    found = sorted(q.codebook.detach().tolist())
    for f, c in zip(found, sorted(centers.tolist())):
        assert torch.allclose(torch.tensor(f), torch.tensor(c), atol=0.1)
    assert len(set(out.codes_T.tolist())) == 3


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = CodebookQuantizer(2, 4, distance="l2", dead_code_threshold=0.5, ema_decay=0.5).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0], [1e3, 1e3], [2e3, 2e3], [3e3, 3e3]]))
    x = 0.01 * torch.randn(16, 2)
    for _ in range(3):
        q(x)  # codes 1-3 are never used: usage decays below 0.5 and they restart onto batch vectors
    cb = q.codebook.detach()
    assert cb[1:].abs().max() < 1.0  # moved from 1e3 onto the data
    assert all(any(torch.allclose(c, r) for r in x) for c in cb[1:])


def test_residual_vq_reduces_error_with_depth():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    errs = []
    for depth in (1, 3):
        torch.manual_seed(1)
        rq = ResidualQuantizer(8, 16, num_quantizers=depth, kmeans_init=True).train()
        out = rq(x)
        errs.append(float(((out.quantized_TD - x) ** 2).mean()))
        assert out.codes_T.shape == (256,) and out.codes_T.max() < 16
    assert errs[1] < 0.7 * errs[0]


def test_lfq_codes_are_sign_bits():
    torch.manual_seed(0)
    q = LFQQuantizer(16, 8)
    x = torch.randn(30, 16)
    out = q(x)
    # LFQ quantizes each of log2(K)=3 projected dims to its sign; the code is the binary number, MSB first
    with torch.no_grad():
        bits = (q.lfq.project_in(x) > 0).long()
    assert torch.equal(out.codes_T, (bits * torch.tensor([4, 2, 1])).sum(-1))
    assert out.quantized_TD.shape == (30, 16)
