"""Nearest-code search: the fused kernel vs torch.cdist+argmin vs a chunked matmul form, each relative
to the bare matmul ``x @ V.T`` of the same shapes (the floor any method must pay).

    python bench/argmin.py                        # 65,536 tokens, K in {16,256,1024,8192}, d in {64,256}
    python bench/argmin.py --K 16 256 --d 64 --reps 5 --threads 1

Methods (indices only):
  matmul   x @ V.T                               the floor, and what it allocates (T x K)
  fused    nearest_code(x, V)                    the compiled kernel (exact, see docs/kernels.md)
  cdist    torch.cdist(x, V).argmin(1)           the usual one-liner (T x K distance matrix)
  chunked  (|v|^2 - 2 x_c @ V.T).argmin(1)       per 4096-token chunk: O(4096 K) memory, not exact on near-ties
  torch    nearest_code(x, V, impl="torch")      the pure-torch fallback (same exact answers as fused)

Time: best of --reps runs (on a shared machine the minimum is the least disturbed figure).  Ratios are
time / matmul time.  tokens/s = T / time.

Peak extra memory, CPU: the process's peak resident set (VmHWM) is reset through /proc/self/clear_refs
before one call, and the peak minus the resident size just before the call is reported.  glibc's
dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_, set below before torch loads) and malloc_trim
runs first, so large buffers are fresh mappings that show up in the peak and are returned on free,
rather than reused from an earlier method's freed heap.  Inputs are allocated before, so only what the
method itself touches counts (page granularity).  GPU: torch.cuda.max_memory_allocated after a reset.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from vqmoe_ds.kernels import kernel_available, nearest_code  # noqa: E402

_libc = ctypes.CDLL("libc.so.6")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(fn, device):
    """Peak memory the call adds on top of what existed before it (see the module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM") - base
    del out
    return peak * 1024


def best_time(fn, reps, device):
    """Best of ``reps`` runs (``fn`` has already run: warm-up and memory measurement)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def methods(x, V, chunk=4096):
    vn = (V * V).sum(1)

    def chunked():
        return torch.cat([(vn - 2.0 * (x[i:i + chunk] @ V.t())).argmin(1) for i in range(0, x.shape[0], chunk)])

    return {
        "matmul": lambda: x @ V.t(),
        "fused": lambda: nearest_code(x, V),
        "cdist": lambda: torch.cdist(x, V).argmin(1),
        "chunked": chunked,
        "torch": lambda: nearest_code(x, V, impl="torch"),
    }


def fmt_rate(tokens, seconds):
    r = tokens / seconds
    return f"{r / 1e6:.2f} M tok/s" if r >= 1e6 else f"{r / 1e3:.0f} k tok/s"


def fmt_mem(b):
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--K", type=int, nargs="+", default=[16, 256, 1024, 8192])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=3, help="timed runs per method (K >= 4096: at most 2)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. --skip torch cdist")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    t_start = time.perf_counter()
    for device in devices:
        if not kernel_available(device):
            print(f"note: no compiled kernel for {device}: 'fused' runs the torch path")
        names = [m for m in ["matmul", "fused", "cdist", "chunked", "torch"] if m not in args.skip]
        print(f"\n### {device}: {args.tokens:,} tokens, fp32, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""))
        print("\nTime and tokens/s (best of runs); ratio = time / matmul time.  Peak extra memory per call.\n")
        head = "| K | d | " + " | ".join(names) + " |"
        print(head)
        print("|" + "---|" * (2 + len(names)))
        for d in args.d:
            for K in args.K:
                g = torch.Generator().manual_seed(K * 1000 + d)
                x = torch.randn(args.tokens, d, generator=g).to(device)
                V = torch.randn(K, d, generator=g).to(device)
                fns = methods(x, V)
                reps = min(args.reps, 2) if K >= 4096 else args.reps
                if K < 4096:  # warm up first (one-time allocations); at large K the memory run warms up
                    for m in names:
                        fns[m]()
                mems = {m: peak_extra_bytes(fns[m], device) for m in names}
                times = {m: best_time(fns[m], reps, device) for m in names}
                base = times.get("matmul")
                cells = []
                for m in names:
                    ratio = f" ({times[m] / base:.2f}x)" if base else ""
                    cells.append(f"{times[m] * 1e3:.1f} ms{ratio}<br>{fmt_rate(args.tokens, times[m])}"
                                 f"<br>{fmt_mem(mems[m])}")
                print(f"| {K} | {d} | " + " | ".join(cells) + " |", flush=True)
                del x, V, fns
    print(f"\n(total bench time {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
