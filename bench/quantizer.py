"""Our CodebookQuantizer vs vector-quantize-pytorch's VectorQuantize, side by side: fwd+bwd time of the
same quantization (same K, dims, distance) on the same tokens: L2 with a gradient-trained codebook, and
cosine with an EMA codebook (vector-quantize-pytorch refuses a gradient-trained cosine codebook: "cosine sim
distance codebook not compatible with learnable codebook yet"; ours supports both).

    python bench/quantizer.py
    python bench/quantizer.py --tokens 16384 --dim 256 --codebook-sizes 16 1024
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from vqmoe_ds.quantizers import CodebookQuantizer  # noqa: E402


def best_time(fn, repeat=5):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--codebook-sizes", type=int, nargs="+", default=[16, 256, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from vector_quantize_pytorch import VectorQuantize

    T, D = args.tokens, args.dim
    x = torch.randn(T, D)
    print(f"{T} tokens, d={D}, fwd+bwd, best of {args.repeat}")
    print("| K | distance / update | codebook dim | ours ms | vector-quantize-pytorch ms | ours / theirs |")
    print("|---:|---|---:|---:|---:|---:|")
    for K in args.codebook_sizes:
        for distance, cdim in (("l2", None), ("cosine", 8)):
            torch.manual_seed(0)
            ema = distance == "cosine"
            ours = CodebookQuantizer(D, K, codebook_dim=cdim, distance=distance, ema=ema).train()
            theirs = VectorQuantize(dim=D, codebook_size=K, codebook_dim=cdim, use_cosine_sim=ema,
                                    learnable_codebook=not ema, ema_update=ema, commitment_weight=0.25,
                                    sync_codebook=False).train()

            def run_ours():
                xx = x.clone().requires_grad_(True)
                out = ours(xx)
                (out.quantized_TD.sum() + out.loss).backward()

            def run_theirs():
                xx = x.clone().unsqueeze(0).requires_grad_(True)
                q, _, loss = theirs(xx)
                (q.sum() + loss.sum()).backward()

            t_o, t_t = best_time(run_ours, args.repeat), best_time(run_theirs, args.repeat)
            print(f"| {K} | {distance} / {'EMA' if ema else 'grad'} | {cdim or D} | {t_o * 1e3:.1f} | {t_t * 1e3:.1f} | {t_o / t_t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
