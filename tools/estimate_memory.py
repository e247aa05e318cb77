#!/usr/bin/env python
"""Per-GPU memory of a training run: model states (params, grads, optimizer) for a config x ZeRO stage x
expert-parallel size x world size, plus activations for a micro-batch.

    python tools/estimate_memory.py --config base --zero 2 --ep 4 --gpus 8 --micro-batch 8 [--model txl]

Model states, bf16 mixed precision with Adam (DeepSpeed's accounting: 2 B bf16 params, 2 B bf16 grads,
12 B fp32 master params + momentum + variance, per parameter), split the way DeepSpeed splits them with MoE:
non-expert parameters are data-parallel over all G ranks, a rank holds N/ep of each layer's experts whose
ZeRO partitions go over the expert-data-parallel group of G/ep ranks.
  stage 0: 16 B/param;  stage 1: 4 + 12/dp;  stage 2: DeepSpeed's
  `estimate_zero2_model_states_mem_needs` (2 + 18/dp: its fp32 grad buffers included).  fp32 training: 16.
Activations (saved for backward, 2 B each; Korthikanti et al. 2022 per layer for attention + LayerNorms,
with the FFN part scaled by the routes per token and the capacity factor): see `activation_bytes`.

``--dtype fp32`` (this project's CPU runs, ds_configs/cpu_fp32.json): 4 B activations and what DeepSpeed's fp32
ZeRO allocates per parameter of a group split over dp ranks: stage 0: 4 params + 4 grads + 8 Adam = 16;
stage 1: 4 params + 4 grads (full, per parameter) + 4 the flattened copy they are averaged in (when dp > 1, up to
the bucket) + 4/dp fp32 partition + 4/dp its gradient + 8/dp Adam;
stage 2: 4 params + 4 reduction bucket (the pages touched of the 5e8-element bucket, up to the group's size) +
4/dp partition + 4/dp its gradient + 8/dp Adam; plus the Adam step's temporaries (torch Adam on the flat
partition: 8/dp).  ``--framework-gib``: what a rank holds before any model (Python, torch, DeepSpeed, data,
communication buffers; on CPU the peak of a ``--config tiny`` run, bench/zero_memory.py).

``--inference``: the memory of a forward pass (evaluation, embeddings, generation) instead: the weights (bf16 2 B
or fp32 4 B per parameter; a rank holds the non-expert weights and N/ep of the experts), one layer's transient
activations, the logits, and the KV cache of ``--micro-batch`` sequences of ``--seq-length``.

``--gpu-memory-gib M``: whether the configuration fits in M GiB per GPU, and a search over ZeRO stage x
expert-parallel size (the divisors of both --gpus and the expert count) x micro-batch (powers of two up to
``--max-micro-batch``) for the configurations that fit: per stage and ep size the largest micro-batch that does.
``--json`` prints the inputs, the estimate and (with M) the verdict and the search.

Why ZeRO 2 can need more memory than ZeRO 1 for the experts: ZeRO partitions an expert's states over its
expert-data-parallel group, the G/ep ranks that hold the same experts.  At ep = G that group is one rank: there is
nothing to partition, and ZeRO 2 still keeps its own fp32 gradient partition, so DeepSpeed's count per expert
parameter is 2 + 18/dp = 20 B at ZeRO 2 against 4 + 12/dp = 16 B at ZeRO 1 (bf16).  ZeRO 2 is smaller only when
18/dp - 12/dp < 2, i.e. an expert-data-parallel group of more than 3 ranks (dp = 2: 11 B vs 10 B; dp = 3: equal;
dp = 4: 6.5 B vs 7 B).  Non-expert parameters are partitioned over all G ranks, where ZeRO 2 wins for G > 3.

Left out everywhere: allocator fragmentation and caching (CUDA caching allocator, glibc arenas), the CUDA
context (~0.5 GiB per GPU), NCCL buffers, checkpoint-save copies, and on GPUs ``--framework-gib`` unless given.
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from vqmoe_ds.models.configs import NAMED, count_params, named_config, routes_per_token  # noqa: E402

GiB = 2 ** 30


def model_state_bytes(params: float, stage: int, dp: int, dtype: str = "bf16", bucket: float = 5e8) -> float:
    if dtype == "fp32":  # see the module docstring; Adam's step temporaries 8/dp included
        if stage == 0:
            return 16 * params + 8 * params
        grads = 4 * params if stage == 1 else 4 * min(params, bucket)
        if stage == 1 and dp > 1:  # the flattened copy of the gradients that are averaged over the group
            grads += 4 * min(params, bucket)
        return 4 * params + grads + (4 + 4 + 8 + 8) * params / dp
    if stage == 0:
        return 16 * params
    if stage == 1:
        return 4 * params + 12 * params / dp
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, num_nodes=1, cpu_offload=False)[1]


def activation_bytes(cfg, micro_batch: int, flash: bool = True, capacity_factor: float = 1.25,
                     bytes_per: int = 2) -> float:
    """Per rank: per layer s*b*h*(attention 11 + LayerNorms 4 + FFN) + 5*a*s^2*b for the attention scores
    (0 with flash / memory-efficient attention); FFN: input 2 + r*(2 F/h [fc1 out] + 2 F/h [act out] + 2 [out])
    where r = routes per token x capacity factor for MoE layers, 1 for dense (SwiGLU: fc1 out 4 F/h, silu(gate)
    and the product 2 F/h each); TXL adds the memory (keys over s + mem_len) to the attention part.  Plus the
    logits (4 B fp32 x V) of one micro-batch.  The constants count 2 B per value; ``bytes_per=4`` (fp32)
    doubles them."""
    s, b, h, a, V = cfg.seq_len, micro_batch, cfg.d_model, cfg.n_head, cfg.vocab_size
    klen = s + cfg.mem_len
    total = 0.0
    for i in range(cfg.n_layer):
        m = cfg.moe_config(i)
        r = 1.0 if m.router == "dense" else routes_per_token(m) * capacity_factor
        F = m.ffn_hidden_size
        attn = 11 * s * b * h * klen / s
        ffn = s * b * h * (2 + r * ((8 if m.activation == "swiglu" else 4) * F / h + 2))
        scores = 0 if flash else 5 * a * s * klen * b
        total += attn + 4 * s * b * h + ffn + scores
    return total * bytes_per / 2 + 4 * s * b * V


def inference_bytes(cfg, params_local: float, micro_batch: int, bytes_per: int = 2) -> dict:
    """A forward pass: weights, the KV cache (2 x layers x s x b x h values), one layer's transient activations
    (the FFN's input, hidden and output rows of every route, the attention's q, k, v and output) and the logits."""
    s, b, h, V, L = cfg.seq_len, micro_batch, cfg.d_model, cfg.vocab_size, cfg.n_layer
    m = cfg.moe_config(cfg.moe_layer_ids()[0]) if cfg.is_moe else cfg.moe_config(0)
    r = 1 if m.router == "dense" else routes_per_token(m)
    width = (3 if m.activation == "swiglu" else 2) * m.ffn_hidden_size
    layer = s * b * (4 * h + r * (2 * h + width)) * bytes_per
    return {"weights": params_local * bytes_per, "kv_cache": 2 * L * s * b * h * bytes_per,
            "activations": layer, "logits": 4 * s * b * V}


def estimate(cfg, zero: int, ep: int, gpus: int, micro: int, dtype: str, flash: bool, framework_gib: float,
             inference: bool) -> dict:
    """The per-GPU figures (GiB) of one configuration: the parts and their total."""
    c = count_params(cfg)
    expert_local = c["experts"] / ep
    bytes_per = 4 if dtype == "fp32" else 2
    if inference:
        parts = inference_bytes(cfg, c["non_expert"] + expert_local, micro, bytes_per)
        out = {k + "_gib": v / GiB for k, v in parts.items()}
    else:
        out = {"non_expert_states_gib": model_state_bytes(c["non_expert"], zero, gpus, dtype) / GiB,
               "expert_states_gib": model_state_bytes(expert_local, zero, gpus // ep, dtype) / GiB,
               "activations_gib": activation_bytes(cfg, micro, flash=flash, bytes_per=bytes_per) / GiB}
    out["framework_gib"] = framework_gib
    out["total_gib"] = sum(out.values())
    return out


def search(cfg, a) -> list:
    """Per ZeRO stage (training) and expert-parallel size: the largest micro-batch (a power of two up to
    --max-micro-batch) whose estimate fits in --gpu-memory-gib, or None when micro-batch 1 does not fit."""
    n_exp = cfg.moe.num_experts if cfg.is_moe else 1
    eps = [e for e in range(1, a.gpus + 1) if a.gpus % e == 0 and n_exp % e == 0]
    micros = [m for m in (2 ** i for i in range(20)) if m <= a.max_micro_batch]
    rows = []
    for zero in ((None,) if a.inference else (0, 1, 2)):
        for ep in eps:
            best = None
            for m in micros:
                est = estimate(cfg, zero or 0, ep, a.gpus, m, a.dtype, not a.no_flash, a.framework_gib, a.inference)
                if est["total_gib"] > a.gpu_memory_gib:
                    break
                best = (m, est["total_gib"])
            rows.append({"zero": zero, "ep": ep, "max_micro_batch": best[0] if best else None,
                         "total_gib": best[1] if best else
                         estimate(cfg, zero or 0, ep, a.gpus, 1, a.dtype, not a.no_flash, a.framework_gib,
                                  a.inference)["total_gib"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="base", choices=list(NAMED))
    p.add_argument("--model", default="gpt", choices=("gpt", "txl"))
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--gpus", type=int, default=8, help="world size")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--no-flash", action="store_true", help="attention materialises s x s scores")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 mixed precision (GPUs), or fp32 (this project's CPU runs)")
    p.add_argument("--inference", action="store_true", help="a forward pass (weights, KV cache) instead of training")
    p.add_argument("--framework-gib", type=float, default=0.0,
                   help="what a rank holds without a model (measured: the peak of a --config tiny run), added")
    p.add_argument("--gpu-memory-gib", type=float,
                   help="memory of one GPU: say whether the configuration fits and search the ones that do")
    p.add_argument("--max-micro-batch", type=int, default=64, help="the largest micro-batch the search tries")
    p.add_argument("--json", action="store_true", help="print the inputs and figures as JSON")
    a = p.parse_args(argv)
    for name in ("gpus", "ep", "micro_batch", "max_micro_batch"):
        if getattr(a, name) < 1:
            print(f"error: --{name.replace('_', '-')} {getattr(a, name)} must be >= 1", file=sys.stderr)
            return 2
    if a.gpu_memory_gib is not None and not (a.gpu_memory_gib > 0 and math.isfinite(a.gpu_memory_gib)):
        print(f"error: --gpu-memory-gib {a.gpu_memory_gib} must be a finite number > 0", file=sys.stderr)
        return 2
    if not (a.framework_gib >= 0 and math.isfinite(a.framework_gib)):
        print(f"error: --framework-gib {a.framework_gib} must be a finite number >= 0", file=sys.stderr)
        return 2
    if a.seq_length is not None and a.seq_length < 1:
        print(f"error: --seq-length {a.seq_length} must be >= 1", file=sys.stderr)
        return 2
    if a.gpus % a.ep:
        print(f"error: --ep {a.ep} does not divide --gpus {a.gpus}: choose an ep size that divides the world", file=sys.stderr)
        return 2
    over = {"model": a.model, "seq_len": a.seq_length}
    if a.model == "txl":
        over["mem_len"] = a.seq_length or NAMED[a.config]["seq_len"]
    cfg = named_config(a.config, **over)
    if cfg.moe.num_experts % a.ep:
        print(f"error: --ep {a.ep} does not divide {cfg.moe.num_experts} experts", file=sys.stderr)
        return 2
    c = count_params(cfg)
    expert_local = c["experts"] / a.ep
    est = estimate(cfg, a.zero, a.ep, a.gpus, a.micro_batch, a.dtype, not a.no_flash, a.framework_gib, a.inference)
    total = est["total_gib"]
    fits = None if a.gpu_memory_gib is None else total <= a.gpu_memory_gib
    rows = search(cfg, a) if a.gpu_memory_gib is not None else None
    if a.json:
        inputs = {k: getattr(a, k) for k in ("config", "model", "zero", "ep", "gpus", "micro_batch", "dtype",
                                              "inference", "framework_gib", "gpu_memory_gib", "max_micro_batch")}
        inputs.update(seq_length=cfg.seq_len, flash=not a.no_flash)
        out = {"inputs": inputs, **est, "parameters": c["total"], "active_parameters": c["active"]}
        if fits is not None:
            out.update(fits=fits, search=rows)
        print(json.dumps(out))
        return 0
    if a.inference:
        print(f"{a.config} {a.model} inference: {c['total'] / 1e9:.3f}B params ({c['active'] / 1e9:.3f}B active), "
              f"{a.dtype}, ep {a.ep}, batch {a.micro_batch} x {cfg.seq_len}")
        print(f"  weights                 {est['weights_gib']:8.3f} GiB  ({(c['non_expert'] + expert_local) / 1e9:.3f}B "
              f"on this rank)")
        print(f"  KV cache                {est['kv_cache_gib']:8.3f} GiB")
        print(f"  activations + logits    {est['activations_gib'] + est['logits_gib']:8.3f} GiB")
    else:
        print(f"{a.config} {a.model}: {c['total'] / 1e6:.1f}M params ({c['experts'] / 1e6:.1f}M in experts), "
              f"{a.gpus} GPUs, ep {a.ep}, ZeRO {a.zero}, {a.dtype}, micro-batch {a.micro_batch} x {cfg.seq_len}")
        print(f"  non-expert model states {est['non_expert_states_gib']:8.3f} GiB  ({c['non_expert'] / 1e6:.1f}M params, "
              f"dp {a.gpus})")
        print(f"  expert model states     {est['expert_states_gib']:8.3f} GiB  ({expert_local / 1e6:.1f}M local params, "
              f"expert-dp {a.gpus // a.ep})")
        print(f"  activations             {est['activations_gib']:8.3f} GiB")
    if a.framework_gib:
        print(f"  framework               {a.framework_gib:8.3f} GiB")
    print(f"  total per GPU           {total:8.3f} GiB" + ("" if a.framework_gib else
                                                           " (+ framework, CUDA context: ~1-2 GiB)"))
    if fits is None:
        return 0
    room = a.gpu_memory_gib - total
    print(f"{'fits' if fits else 'does not fit'} in {a.gpu_memory_gib:g} GiB per GPU "
          f"({'%.3f GiB to spare' % room if fits else '%.3f GiB short' % -room}"
          f"{'' if a.framework_gib else '; framework buffers not counted: --framework-gib'})")
    what = "ep" if a.inference else "ZeRO, ep"
    print(f"search ({what}: the largest micro-batch of 1..{a.max_micro_batch} that fits, its total per GPU):")
    for r in rows:
        head = f"  {'' if a.inference else 'ZeRO %d, ' % r['zero']}ep {r['ep']:<3d}"
        if r["max_micro_batch"] is None:
            print(f"{head} none: micro-batch 1 needs {r['total_gib']:.3f} GiB")
        else:
            print(f"{head} micro-batch {r['max_micro_batch']:<3d} {r['total_gib']:8.3f} GiB")
    return 0


def cli() -> None:
    """The console script ``vqmoe-estimate-memory`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
