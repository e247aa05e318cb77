"""Plain, loop-over-tokens-and-experts references the tests compare the library against.  Written from
the equations, not from the library's code: no sorting, no index tricks, no batching over experts."""
import math

import torch
import torch.nn.functional as F


def expert_ref(expert, v):
    """One expert MLP on one token vector, from its weights."""
    h = v @ expert.fc1.weight.t() + expert.fc1.bias
    return F.gelu(h) @ expert.fc2.weight.t() + expert.fc2.bias


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


def moe_ref(routes_per_choice, experts, num_tokens, capacity):
    """routes_per_choice[c] = list over rows of (token, expert, weight, input) or None; choice-major priority.

    Returns the [T, D] output: sum over kept routes of weight * expert(input)."""
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
            y = w * expert_ref(experts[e], v)
            out[t] = y if out[t] is None else out[t] + y
    d = experts[0].fc2.weight.shape[0]
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
