"""Plain, loop-over-tokens-and-experts references the tests compare the library against.  Written from
the equations, not from the library's code: no sorting, no index tricks, no batching over experts.

The ``*_raw`` helpers take raw tensors only (weights pulled out of a layer once, by name, as detached copies: see
``layer_harness.raw_tensors``); nothing here imports vqmoe_ds."""
import math

import torch
import torch.nn.functional as F


def expert_ref(expert, v):
    """One expert MLP on one token vector, from its weights: a module with fc1/fc2, or a raw (w1, b1, w2, b2)."""
    if isinstance(expert, tuple):
        return mlp_raw(v, *expert)
    h = v @ expert.fc1.weight.t() + expert.fc1.bias
    return F.gelu(h) @ expert.fc2.weight.t() + expert.fc2.bias


def mlp_raw(v, w1, b1, w2, b2, activation="gelu"):
    """x W1^T + b1 -> activation -> W2^T + b2 on one token vector (SwiGLU: W1 holds the gate's rows, then the up
    projection's; silu(gate) * up)."""
    h = v @ w1.t() + (b1 if b1 is not None else 0)
    if activation == "swiglu":
        half = h.shape[-1] // 2
        h = F.silu(h[..., :half]) * h[..., half:]
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)
    return h @ w2.t() + (b2 if b2 is not None else 0)


def linear_raw(W, name, v):
    """v W^T + b of the linear called ``name`` in the raw tensors W (no bias when W has none)."""
    b = W.get(name + ".bias")
    return v @ W[name + ".weight"].t() + (b if b is not None else 0)


def experts_raw(W, num_experts, prefix="moe.deepspeed_moe.experts.deepspeed_experts."):
    """The experts' (w1, b1, w2, b2) from the raw tensors W, expert e under ``prefix + e``."""
    return [tuple(W.get(f"{prefix}{e}.{n}") for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
            for e in range(num_experts)]


def softmax_raw(logits):
    """softmax over a 1-d list of logits, written out: exp(l - max) / sum."""
    m = logits.max().detach()
    e = torch.exp(logits - m)
    return e / e.sum()


def sigmoid_raw(v):
    return 1.0 / (1.0 + torch.exp(-v))


def top_indices(select, k):
    """The k largest entries of ``select`` by repeated scans (ties to the lower index)."""
    vals = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in select]
    chosen = []
    for _ in range(k):
        best = None
        for e in range(len(vals)):
            if e not in chosen and (best is None or vals[e] > vals[best]):
                best = e
        chosen.append(best)
    return chosen


def nearest_code_raw(z, codebook, distance):
    """Brute force over the codes: the index of the largest cosine similarity (``distance="cosine"``) or of the
    smallest squared L2 distance, ties to the lower index, in fp64."""
    z = z.detach().double()
    best, best_val = None, None
    for j in range(codebook.shape[0]):
        c = codebook[j].detach().double()
        if distance == "cosine":
            val = -float(z @ c / (z.norm() * c.norm()))
        else:
            val = float(((z - c) ** 2).sum())
        if best is None or val < best_val:
            best, best_val = j, val
    return best


def vq_raw(x_t, codebook, distance, in_proj=None, out_proj=None, scale="token"):
    """(code, x~ straight-through, codebook term, commitment term, number of elements) of one token, from the raw
    codebook [K, C] and optional (weight, bias) projections.  Cosine: z and the codes are unit vectors; a cosine
    codebook without projections gives x~ = |x| v (``scale="token"``) or the unit code v (``scale="code"``).  The
    terms are ||v - sg[z]||^2 and ||z - sg[v]||^2 (eq. 8 before the means)."""
    z = x_t if in_proj is None else x_t @ in_proj[0].t() + in_proj[1]
    cb = codebook
    if distance == "cosine":
        z = z / z.norm()
        cb = torch.stack([cb[j] / cb[j].norm() for j in range(cb.shape[0])])
    code = nearest_code_raw(z, cb, distance)
    v = cb[code]
    zq = z + (v - z).detach()
    out = zq if out_proj is None else zq @ out_proj[0].t() + out_proj[1]
    if distance == "cosine" and out_proj is None and in_proj is None and scale == "token":
        out = out * x_t.norm()
    return code, out, ((v - z.detach()) ** 2).sum(), ((z - v.detach()) ** 2).sum(), z.numel()


def topk_ref(probs, k, normalize=True):
    """Indices of the k largest probabilities (ties to the lower index) and their combine weights:
    Switch Transformer (k = 1): the probability p_e; GShard (k >= 2): p_e / sum of the chosen p, or p_e as is
    when ``normalize`` is off (OLMoE)."""
    chosen = []
    for _ in range(k):
        best = None
        for e in range(probs.shape[0]):
            if e in chosen:
                continue
            if best is None or probs[e] > probs[best]:
                best = e
        chosen.append(best)
    return chosen, gate_ref(probs, chosen, normalize)


def gate_ref(probs, chosen, normalize=True):
    if len(chosen) == 1 or not normalize:
        return [probs[e] for e in chosen]
    tot = sum(probs[e] for e in chosen)
    return [probs[e] / tot for e in chosen]


def moe_ref(routes_per_choice, experts, num_tokens, capacity, kept=None):
    """routes_per_choice[c] = list over rows of (token, expert, weight, input) or None; choice-major priority.

    ``experts``: modules or raw (w1, b1, w2, b2) tuples.  ``kept``: a list that receives (token, expert) of every
    route that fits the capacity.  Returns the [T, D] output: sum over kept routes of weight * expert(input)."""
    used = {}
    out = [None] * num_tokens
    for choice in routes_per_choice:
        for route in choice:
            if route is None:
                continue
            t, e, w, v = route
            if capacity is not None and used.get(e, 0) >= capacity:
                continue
            used[e] = used.get(e, 0) + 1
            if kept is not None:
                kept.append((t, e))
            y = w * expert_ref(experts[e], v)
            out[t] = y if out[t] is None else out[t] + y
    d = experts[0][2].shape[0] if isinstance(experts[0], tuple) else experts[0].fc2.weight.shape[0]
    return torch.stack([o if o is not None else torch.zeros(d) for o in out])


def capacity_ref(num_routes, num_experts, factor, minimum):
    return max(math.ceil(factor * num_routes / num_experts), minimum)


def vq_ref(x_t, quantizer, scale="token"):
    """(code, straight-through quantized vector, per-token loss terms) for one token.  A cosine codebook in the
    token's own dimension returns the code's direction at the token's norm (``scale="token"``)."""
    q = quantizer
    z = x_t if isinstance(q.in_proj, torch.nn.Identity) else x_t @ q.in_proj.weight.t() + q.in_proj.bias
    cb = q.codebook
    if q.distance == "cosine":
        z = z / z.norm()
        cb = cb / cb.norm(dim=1, keepdim=True)
        scores = [float(z.detach() @ cb[j].detach()) for j in range(cb.shape[0])]
        code = max(range(len(scores)), key=lambda j: (scores[j], -j))
    else:
        dists = [float(((z.detach() - cb[j].detach()) ** 2).sum()) for j in range(cb.shape[0])]
        code = min(range(len(dists)), key=lambda j: (dists[j], j))
    v = cb[code]
    zq = z + (v - z).detach()
    out = zq if isinstance(q.out_proj, torch.nn.Identity) else zq @ q.out_proj.weight.t() + q.out_proj.bias
    if q.distance == "cosine" and isinstance(q.out_proj, torch.nn.Identity) and scale == "token":
        out = out * x_t.norm()
    codebook_term = ((v - z.detach()) ** 2).sum()
    commit_term = ((z - v.detach()) ** 2).sum()
    return code, out, codebook_term, commit_term, z.numel()
