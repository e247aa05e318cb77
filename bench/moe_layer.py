"""fwd+bwd throughput of MoE layers vs the bare expert compute they route to, side by side in one run.

For every layer the "bare" figure pushes the *same* token x expert assignments the layer made (after
capacity) through the same expert MLPs with no routing at all: per expert, one contiguous block of rows
through Linear -> GELU -> Linear, forward and backward.  layer time / bare time is the routing + dispatch
+ combine overhead (1.00 = free routing).

    python bench/moe_layer.py                     # 2k / 8k / 16k tokens, d=256, hidden 1024, 8 experts
    python bench/moe_layer.py --tokens 8192 --repeat 3
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from vqmoe_ds.moe import MoEConfig  # noqa: E402


def timeit(fn, repeat, warmup=1):
    """Best of ``repeat`` wall-clock runs: the run least disturbed by other jobs.  (Process CPU time is no
    steadier here: torch's OpenMP threads spin while they wait for a descheduled sibling.)  For figures
    worth quoting, run on an otherwise idle machine."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
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
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def bare_expert_step(experts, counts, D):
    """The same per-expert row counts through the same expert MLPs, no routing: the floor."""
    xs = [torch.randn(int(n), D, requires_grad=True) for n in counts]
    gs = [torch.randn(int(n), D) for n in counts]

    def step():
        for e, x, g in zip(experts, xs, gs):
            e(x).backward(g)
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
            self.moe = MoE(hidden_size=D, expert=ExpertMLP(D, H), num_experts=E, ep_size=1, k=k,
                           capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=True,
                           use_rts=False, top2_2nd_expert_sampling=False)

        def forward(self, x):
            y, aux, counts = self.moe(x)
            self.counts = counts
            return y, aux
    return Stock()


def stock_assignments(layer, x):
    """Kept routes per expert of DeepSpeed's own gate on x (its capacity applied)."""
    gate = layer.moe.deepspeed_moe.gate
    with torch.no_grad():
        out = gate(x, None, True, False)
    indices = out[3]
    return torch.bincount(indices[indices >= 0].long(), minlength=layer.moe.num_experts).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    D, H, E, cf = args.hidden, args.ffn, args.experts, args.capacity_factor
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={D}, hidden={H}, {E} experts, "
          f"capacity factor {cf}; fwd+bwd, layer and bare alternated, best of {args.repeat} each")
    variants = {
        "vqmoe pretrain (top-2 + VQ)": dict(router="vqmoe", codebook_size=16, codebook_dim=8, vq_distance="cosine"),
        "vqmoe discrete_only": dict(router="vqmoe", vqmoe_mode="discrete_only", codebook_size=16, codebook_dim=8,
                                    vq_distance="cosine"),
        "top-2 (ours, sorted dispatch)": dict(router="topk", top_k=2),
        "top-2 (ours via DeepSpeed dispatch)": dict(router="topk", top_k=2, dispatcher="deepspeed"),
    }
    rows = []
    for T in args.tokens:
        torch.manual_seed(0)
        x = torch.randn(T, D)
        for name, kw in variants.items():
            torch.manual_seed(0)
            layer = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, capacity_factor=cf, **kw).build()
            from vqmoe_ds.moe.dispatch import capacity_for, plan_routes

            with torch.no_grad():
                _, grid, _, _ = layer.route(x)
                _, experts_R, _ = grid.flat()
                plan = plan_routes(experts_R, E, capacity_for(experts_R.numel(), E, cf, layer.cfg.min_capacity))
            counts = plan.counts_E.tolist()
            t_layer, t_bare = paired_times(layer_step(layer, x), bare_expert_step(layer.experts, counts, D), args.repeat)
            rows.append((T, name, sum(counts), t_layer, t_bare))
            print(f"  {T:6d} {name:40s} {T / t_layer:9.0f} tok/s  {t_layer * 1e3:8.1f} ms  bare {t_bare * 1e3:8.1f} ms"
                  f"  ratio {t_layer / t_bare:5.2f}", flush=True)
        torch.manual_seed(0)
        stock = stock_deepspeed_moe(D, H, E, 2, cf)
        counts = stock_assignments(stock, x)
        t_layer, t_bare = paired_times(layer_step(stock, x),
                                       bare_expert_step(stock.moe.deepspeed_moe.experts.deepspeed_experts, counts, D),
                                       args.repeat)
        rows.append((T, "deepspeed.moe MoE top-2 (stock)", sum(counts), t_layer, t_bare))
        print(f"  {T:6d} {'deepspeed.moe MoE top-2 (stock)':40s} {T / t_layer:9.0f} tok/s  {t_layer * 1e3:8.1f} ms  "
              f"bare {t_bare * 1e3:8.1f} ms  ratio {t_layer / t_bare:5.2f}", flush=True)
    print("\n| tokens | layer | routed rows | tokens/s | layer ms | bare experts ms | layer / bare |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for T, name, n, tl, tb in rows:
        print(f"| {T} | {name} | {n} | {T / tl:,.0f} | {tl * 1e3:.1f} | {tb * 1e3:.1f} | {tl / tb:.2f} |")


if __name__ == "__main__":
    main()
