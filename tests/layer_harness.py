"""Shared driver for the layer-vs-reference tests: run the layer and a reference on the same parameters,
return outputs, aux losses and all gradients of both.

``run_raw`` hands the reference only raw tensors (every parameter and buffer detached and cloned once, by name), so
the reference cannot call the layer's router, quantizer, gates or experts; its gradients land on those copies."""
import torch

from vqmoe_ds.moe import MoEConfig


def make_layer(seed=0, **kw):
    """A small MoE layer (``expert_impl``: "loop" or "grouped" for the grouped-GEMM experts)."""
    base = dict(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, drop_tokens=False, min_capacity=0)
    base.update(kw)
    torch.manual_seed(seed)
    layer = MoEConfig(**base).build()
    # non-zero biases (the experts', the shared expert's and its gate's start at zero) so the reference checks them too
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias") and (name.startswith(("moe.", "shared.", "shared_gate."))):
                p.normal_(0, 0.1)
    return layer


def raw_tensors(layer):
    """Every parameter and buffer of ``layer`` by name, detached and cloned: parameters as new leaves (requiring a
    gradient as in the layer), so a reference computes on them and its gradients land on them."""
    W = {n: b.detach().clone() for n, b in layer.named_buffers()}
    W.update({n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in layer.named_parameters()})
    return W


def run_raw(layer, reference, T=24, seed=1, shape=None, ids=None):
    """reference(W, cfg, x) -> (y, aux) on the raw tensors W of ``raw_tensors(layer)`` (taken before the layer runs),
    against ``layer(x, None, ids)`` on the same random x.  Returns (dict of max abs differences of the output, aux loss,
    x's gradient and every parameter's gradient, a missing gradient counting as zeros; the layer's output)."""
    g = torch.Generator().manual_seed(seed)
    D = layer.cfg.hidden_size
    shape = shape or (T, D)
    x0 = torch.randn(*shape, generator=g)
    R = torch.randn(*shape, generator=g)
    W = raw_tensors(layer)
    x_ref = x0.clone().requires_grad_(True)
    y_ref, aux_ref = reference(W, layer.cfg, x_ref)
    ((y_ref * R).sum() + aux_ref).backward()
    x = x0.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y, aux = layer(x, None, ids)
    ((y * R).sum() + aux).backward()
    aux_ref = float(torch.as_tensor(aux_ref).detach())
    diffs = {"y": (y - y_ref).abs().max().item(), "aux": abs(float(aux.detach()) - aux_ref),
             "grad_x": (x.grad - x_ref.grad).abs().max().item()}
    for n, p in layer.named_parameters():
        if not p.requires_grad:
            continue
        a, b = p.grad, W[n].grad
        if a is None and b is None:
            continue
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        diffs["grad:" + n] = (a - b).abs().max().item()
    return diffs, y.detach()


def run_both(layer, reference, T=24, seed=1, shape=None, ids=None):
    """reference(layer, x) -> (y, aux), against ``layer(x, None, ids)`` on the same random x of ``shape`` (default
    [T, D]).  Returns (dict of max abs differences of the output, aux loss, x's and every parameter's gradient;
    a gradient missing on one side counts as zeros), the layer's output)."""
    g = torch.Generator().manual_seed(seed)
    D = layer.cfg.hidden_size
    shape = shape or (T, D)
    x0 = torch.randn(*shape, generator=g)
    R = torch.randn(*shape, generator=g)
    params = [p for p in layer.parameters() if p.requires_grad]

    def go(fn):
        x = x0.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        y, aux = fn(x)
        ((y * R).sum() + aux).backward()
        return y.detach(), torch.as_tensor(aux).detach(), x.grad.clone(), [None if p.grad is None else p.grad.clone() for p in params]

    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y_ref, aux_ref, gx_ref, gp_ref = go(lambda x: reference(layer, x))
    layer.load_state_dict(state)  # the forward may update buffers (EMA, usage): start both from the same state
    y, aux, gx, gp = go(lambda x: layer(x, None, ids))
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    diffs = {"y": (y - y_ref).abs().max().item(), "aux": abs(aux.item() - float(aux_ref)), "grad_x": (gx - gx_ref).abs().max().item()}
    for n, a, b in zip(names, gp, gp_ref):
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
        diffs["grad:" + n] = (a - b).abs().max().item()
    return diffs, y
