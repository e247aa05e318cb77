"""fwd+bwd throughput of MoE layers vs the bare expert compute they route to, side by side in one run.

For every layer two floors are timed on the *same* token x expert assignments the layer made (after capacity):

  * "bare experts": per expert, its block of rows through its own MLP (Linear -> activation -> Linear), forward
    and backward, with no routing: layer / bare is the routing + dispatch + combine overhead (1.00 = free);
  * "one GEMM": all routed rows through one MLP of the same shape at once: the cost of the expert arithmetic
    without any per-expert launch, the floor a grouped GEMM aims at.

The VQMoE rows use the shipped default codebook (cosine, in the model dimension, x~ at the token's scale) and a
low-dimensional one.  The top-k and default VQMoE layers run twice: with the local experts as a loop
(``--moe-expert-impl loop``) and as one grouped GEMM per projection (``grouped``); the ratio of the two is printed.

    python bench/moe_layer.py                     # 2k / 8k / 16k tokens, d=256, hidden 1024, 8 experts, CPU fp32
    python bench/moe_layer.py --tokens 8192 --repeat 3
    python bench/moe_layer.py --device cuda --dtype bf16 --hidden 2048 --ffn 1024 --experts 64 --top-k 8 \
        --tokens 8192 16384                       # the olmoe layer shape on a GPU
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from vqmoe_ds.moe import MoEConfig  # noqa: E402


DEVICE = torch.device("cpu")
DTYPE = torch.float32


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeat, warmup=1):
    """Best of ``repeat`` wall-clock runs: the run least disturbed by other jobs.  (Process CPU time is no
    steadier here: torch's OpenMP threads spin while they wait for a descheduled sibling.)  For figures
    worth quoting, run on an otherwise idle machine."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def paired_times(step_a, step_b, repeat, warmup=1):
    """Best of ``repeat`` for two steps run alternately (a, b, a, b, ...): a slow stretch of the shared
    machine hits both, so their ratio is steadier than from two separate series."""
    for _ in range(warmup):
        step_a(), step_b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, ts in ((step_a, ta), (step_b, tb)):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def bare_expert_step(experts, counts, D):
    """The same per-expert row counts through the same expert MLPs, no routing: the floor."""
    xs = [torch.randn(int(n), D, device=DEVICE, dtype=DTYPE, requires_grad=True) for n in counts]
    gs = [torch.randn(int(n), D, device=DEVICE, dtype=DTYPE) for n in counts]

    def step():
        for e, x, g in zip(experts, xs, gs):
            e(x).backward(g)
    return step


def one_gemm_step(expert, rows, D):
    """All ``rows`` routed rows through one expert MLP of the same shape: no per-expert work at all."""
    x = torch.randn(int(rows), D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(int(rows), D, device=DEVICE, dtype=DTYPE)

    def step():
        expert(x).backward(g)
    return step


def bare_expert_time(experts, counts, D, repeat):
    return timeit(bare_expert_step(experts, counts, D), repeat)


def layer_step(layer, x):
    R = torch.randn_like(x)

    def step():
        xx = x.detach().requires_grad_(True)
        y, aux = layer(xx)
        torch.autograd.backward([y, aux], [R, torch.ones_like(aux)])  # as the bare run: gradient fed in directly
    return step


def layer_time(layer, x, repeat):
    return timeit(layer_step(layer, x), repeat)


def stock_deepspeed_moe(D, H, E, k, cf):
    from deepspeed.moe.layer import MoE

    from vqmoe_ds.moe.layer import ExpertMLP

    class Stock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(hidden_size=D, expert=ExpertMLP(D, H, ACTIVATION), num_experts=E, ep_size=1, k=k,
                           capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=True,
                           use_rts=False, top2_2nd_expert_sampling=False)

        def forward(self, x):
            y, aux, counts = self.moe(x)
            self.counts = counts
            return y, aux
    return Stock()


def ours_through_deepspeed(D, H, E, k, cf):
    """Our top-k router in the gate slot of a stock ``deepspeed.moe.layer.MoE`` (bench/deepspeed_gate.py): the same
    routing as the library's layer, DeepSpeed's ``MOELayer`` dispatch (experts padded to the capacity)."""
    from deepspeed.moe.layer import MoE
    from deepspeed_gate import DeepSpeedGate

    from vqmoe_ds.moe.layer import ExpertMLP
    from vqmoe_ds.routers import build_router

    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=k, capacity_factor=cf,
                    eval_capacity_factor=cf, activation=ACTIVATION)

    class OursThroughDeepSpeed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(hidden_size=D, expert=ExpertMLP(D, H, ACTIVATION), num_experts=E, ep_size=1, k=1,
                           capacity_factor=cf, eval_capacity_factor=cf, min_capacity=cfg.min_capacity,
                           drop_tokens=True)
            self.moe.deepspeed_moe.gate = DeepSpeedGate(E, cf, cf, cfg.min_capacity, True, router=build_router(cfg))

        def forward(self, x):
            y, aux, counts = self.moe(x)
            self.counts = counts
            return y, aux
    return OursThroughDeepSpeed()


def stock_assignments(layer, x):
    """Kept routes per expert of DeepSpeed's own gate on x (its capacity applied)."""
    gate = layer.moe.deepspeed_moe.gate
    with torch.no_grad():
        out = gate(x, None, True, False)
    indices = out[3]
    return torch.bincount(indices[indices >= 0].long(), minlength=layer.moe.num_experts).tolist()


ACTIVATION = "gelu"


def main():
    global DEVICE, DTYPE, ACTIVATION
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--activation", default="gelu", help="the experts' activation (gelu, swiglu, ...)")
    args = ap.parse_args()
    DEVICE, DTYPE, ACTIVATION = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], \
        args.activation
    if DEVICE.type == "cuda":
        import deepspeed  # noqa: F401  (the MoE layers need a process group)

        from vqmoe_ds.parallel import init_single_process

        init_single_process()
    D, H, E, cf, k = args.hidden, args.ffn, args.experts, args.capacity_factor, args.top_k
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; d={D}, "
          f"hidden={H}, {E} experts, top-{k}, capacity factor {cf}; fwd+bwd, each layer and its floors alternated, "
          f"best of {args.repeat} each")
    variants = {
        f"vqmoe pretrain (top-{k} + VQ), default codebook": dict(router="vqmoe", top_k=k, codebook_size=max(16, E),
                                                                expert_impl="loop"),
        f"vqmoe pretrain (top-{k} + VQ), codebook dim 8": dict(router="vqmoe", top_k=k, codebook_size=max(16, E),
                                                              codebook_dim=8, expert_impl="loop"),
        "vqmoe discrete_only, default codebook": dict(router="vqmoe", vqmoe_mode="discrete_only",
                                                      codebook_size=max(16, E), expert_impl="loop"),
        f"vqmoe pretrain (top-{k} + VQ), default codebook, grouped GEMM": dict(router="vqmoe", top_k=k,
                                                                              codebook_size=max(16, E),
                                                                              expert_impl="grouped"),
        f"top-{k} (ours, sorted dispatch, expert loop)": dict(router="topk", top_k=k, expert_impl="loop"),
        f"top-{k} (ours, sorted dispatch, grouped GEMM)": dict(router="topk", top_k=k, expert_impl="grouped"),
    }
    rows = []
    for T in args.tokens:
        torch.manual_seed(0)
        x = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
        for name, kw in variants.items():
            torch.manual_seed(0)
            layer = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, capacity_factor=cf,
                              activation=ACTIVATION, **kw).build().to(DEVICE, DTYPE)
            from vqmoe_ds.moe.dispatch import capacity_for, plan_routes

            with torch.no_grad():
                _, grid, _, _ = layer.route(x)
                _, experts_R, _ = grid.flat()
                plan = plan_routes(experts_R, E, capacity_for(experts_R.numel(), E, cf, layer.cfg.min_capacity))
            counts = plan.counts_E.tolist()
            rows.append(measure(T, name, layer, x, layer.experts, counts, D, args.repeat))
        for name, build in ((f"top-{k} (ours via DeepSpeed dispatch)", ours_through_deepspeed),
                            (f"deepspeed.moe MoE top-{k} (stock)", stock_deepspeed_moe)):
            torch.manual_seed(0)
            stock = build(D, H, E, k, cf).to(DEVICE, DTYPE)
            counts = stock_assignments(stock, x)
            rows.append(measure(T, name, stock, x, stock.moe.deepspeed_moe.experts.deepspeed_experts, counts, D,
                                args.repeat))
    by = {(T, name): tl for T, name, _, tl, _, _ in rows}
    print("\nlayer fwd+bwd ms with grouped-GEMM experts / with the loop over experts (same routing):")
    for T in args.tokens:
        for loop_name in (f"top-{k} (ours, sorted dispatch, expert loop)", f"vqmoe pretrain (top-{k} + VQ), default codebook"):
            grouped_name = loop_name.replace("expert loop", "grouped GEMM") if "loop" in loop_name else \
                loop_name + ", grouped GEMM"
            print(f"  {T:6d} {loop_name.split(' (')[0]:6s}: {by[(T, grouped_name)] / by[(T, loop_name)]:.2f}")
    print("\n| tokens | layer | routed rows | tokens/s | layer ms | bare experts ms | one GEMM ms | layer / bare "
          "experts | layer / one GEMM |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for T, name, n, tl, tb, tg in rows:
        print(f"| {T} | {name} | {n} | {T / tl:,.0f} | {tl * 1e3:.1f} | {tb * 1e3:.1f} | {tg * 1e3:.1f} | {tl / tb:.2f} "
              f"| {tl / tg:.2f} |")


def measure(T, name, layer, x, experts, counts, D, repeat):
    """(tokens, name, routed rows, layer s, bare experts s, one GEMM s): the layer alternated with each floor."""
    t_layer, t_bare = paired_times(layer_step(layer, x), bare_expert_step(experts, counts, D), repeat)
    t_layer2, t_gemm = paired_times(layer_step(layer, x), one_gemm_step(experts[0], sum(counts), D), repeat)
    t_layer = min(t_layer, t_layer2)
    print(f"  {T:6d} {name:48s} {T / t_layer:9.0f} tok/s  {t_layer * 1e3:8.1f} ms  bare {t_bare * 1e3:8.1f} ms  "
          f"one GEMM {t_gemm * 1e3:8.1f} ms  layer/bare {t_layer / t_bare:5.2f}  layer/GEMM {t_layer / t_gemm:5.2f}",
          flush=True)
    return T, name, sum(counts), t_layer, t_bare, t_gemm


if __name__ == "__main__":
    main()
