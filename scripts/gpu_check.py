#!/usr/bin/env python
"""The GPU check (``make gpu-check``): on a machine with one or more NVIDIA GPUs, within about 8 minutes,

  1. the CUDA nearest-code kernel's tests (tests/test_nearest_code_cuda.py, the kernel opted in);
  2. ``bench/argmin.py`` on the GPU (fused kernel vs the matmul and cdist);
  3. a 1-GPU bf16 NCCL pretraining of the tiny VQMoE GPT for 100 steps: the loss falls, checkpoints are saved, and
     a resume from step 50 gives steps 51-100 bit for bit;
  4. the same at 2 GPUs with expert parallelism 2, if there are 2;
  5. the top-k and VQMoE layers at the olmoe layer shape in bf16, forward and backward under CUDA's sync debug
     mode "error" (no device-to-host sync with the grouped-GEMM experts);
  6. ``bench/moe_layer.py`` on the GPU at the olmoe layer shape (d 2048, 64 experts top-8, expert FFN 1024, bf16):
     our layer with grouped-GEMM experts and with the expert loop, DeepSpeed's stock MoE and the floors;

then one summary table.  Each step has its own time limit and a failing step does not stop the others.  Exit
status: 0 when every step passed.  ``--cpu`` runs the same steps scaled down on the CPU (gloo, fp32), to check
this script itself on a machine without a GPU.  Logs: ``runs/gpu_check/<step>.log``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, log, timeout, env):
    """Run ``cmd``; (ok, seconds, last lines of its output)."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT)
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
            f.write(f"\n[timed out after {timeout} s]\n")
    tail = open(log).read().strip().splitlines()[-12:]
    return ok, time.time() - t0, tail


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def pretrain_and_resume(name, nproc, out, env, args, timeout, steps):
    """A run of ``steps`` steps saving at half of them, then a resume from there to the end: (ok, seconds, figure)."""
    half = steps // 2
    from vqmoe_ds.training.launch import free_port, torchrun_cmd

    full, resumed = os.path.join(out, f"{name}_full"), os.path.join(out, f"{name}_resumed")
    ok1, t1, tail1 = sh(torchrun_cmd(nproc, [*args, "--out-dir", full, "--overwrite"], free_port()),
                        os.path.join(out, f"{name}_full.log"), timeout, env)
    if not ok1:
        return False, t1, "training failed: " + (tail1[-1] if tail1 else "")
    ck = os.path.join(full, "checkpoints")
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(f"step{half}")
    ok2, t2, tail2 = sh(torchrun_cmd(nproc, [*args, "--out-dir", resumed, "--load", ck, "--save",
                                             os.path.join(resumed, "ck")], free_port()),
                        os.path.join(out, f"{name}_resumed.log"), timeout, env)
    if not ok2:
        return False, t1 + t2, "resume failed: " + (tail2[-1] if tail2 else "")
    a, b = losses(full), losses(resumed)
    steps_done = sorted(b)
    first, last = a[min(a)], sum(a[s] for s in sorted(a)[-10:]) / 10
    exact = all(a.get(s) == b[s] for s in steps_done)
    worst = max(abs(a.get(s, float("nan")) - b[s]) for s in steps_done)
    ok = last < first - 0.3 and exact and steps_done == list(range(half + 1, steps + 1))
    return ok, t1 + t2, (f"loss {first:.3f} -> {last:.3f}; resume from {half}: steps {steps_done[0]}-"
                         f"{steps_done[-1]} {'bit-exact' if exact else f'differ by up to {worst:.2e}'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the steps scaled down on the CPU (checks this script)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", VQMOE_DS_CUDA_KERNEL="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
    else:
        if gpus == 0:
            print("error: no CUDA GPU is visible (torch.cuda.device_count() == 0): run on a GPU machine, or --cpu "
                  "to check this script", file=sys.stderr)
            return 2
        env["DS_ACCELERATOR"] = "cuda"  # the Makefile sets cpu for the CPU targets
        props = torch.cuda.get_device_properties(0)
        print(f"{gpus} x {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}, NCCL "
              f"{'.'.join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, 'nccl') else '?'}", flush=True)
    py = sys.executable
    results = []

    def step(name, fn):
        print(f"[{name}] ...", flush=True)
        ok, seconds, figure = fn()
        results.append((name, ok, seconds, figure))
        print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.0f} s: {figure}", flush=True)

    if not args.cpu:
        step("CUDA kernel tests", lambda: _last(sh([py, "-m", "pytest", "-q", "tests/test_nearest_code_cuda.py"],
                                                   os.path.join(args.out, "kernel_tests.log"), 180, env)))
    step("bench/argmin.py", lambda: _last(sh(
        [py, "bench/argmin.py", "--device", "cpu" if args.cpu else "cuda", "--tokens", "4096" if args.cpu else "65536",
         "--K", "16", "1024", "--d", "64", "256", "--reps", "2"], os.path.join(args.out, "argmin.log"), 180, env)))
    ds_config = os.path.join(ROOT, "ds_configs", "cpu_fp32.json" if args.cpu else "gpu_bf16_zero1.json")
    if not args.cpu and shutil.which("nvcc") is None:
        # DeepSpeed JIT-compiles its fused CUDA Adam with nvcc; without a CUDA toolkit use torch's Adam instead
        with open(ds_config) as f:
            cfg = json.load(f)
        cfg["optimizer"]["params"]["torch_adam"] = True
        ds_config = os.path.join(args.out, "gpu_bf16_zero1_torch_adam.json")
        with open(ds_config, "w") as f:
            json.dump(cfg, f, indent=2)
        print(f"nvcc not found: the bf16 runs use torch's Adam ({ds_config})", flush=True)
    steps = 40 if args.cpu else 100
    common = ["--config", "tiny", "--router", "vqmoe", "--train-iters", str(steps), "--save-interval", str(steps // 2),
              "--log-interval", "1", "--eval-interval", str(steps // 2), "--eval-iters", "4", "--test-iters", "4",
              "--corpus-bytes", "400000", "--micro-batch-size", "16", "--lr", "3e-3", "--no-progress", "--no-plots",
              "--deepspeed_config", ds_config]
    kind = "CPU fp32" if args.cpu else "bf16 NCCL"
    step(f"pretrain 1 {'rank' if args.cpu else 'GPU'}, {kind}, resume",
         lambda: pretrain_and_resume("one", 1, args.out, env, common, 240, steps))
    if args.cpu or gpus >= 2:
        step(f"pretrain 2 {'ranks' if args.cpu else 'GPUs'}, ep 2, {kind}, resume",
             lambda: pretrain_and_resume("two", 2, args.out, env, [*common, "--moe-expert-parallel-size", "2"], 240,
                                         steps))
    if not args.cpu:
        step("grouped-GEMM layers without host sync (olmoe shape, bf16)", lambda: _last(sh(
            [py, "-c", SYNC_CHECK], os.path.join(args.out, "sync_check.log"), 180, env)))
    shape = (["--tokens", "1024", "--repeat", "1"] if args.cpu else
             ["--device", "cuda", "--dtype", "bf16", "--hidden", "2048", "--ffn", "1024", "--experts", "64", "--top-k",
              "8", "--tokens", "8192", "16384", "--repeat", "3"])
    step("bench/moe_layer.py" + ("" if args.cpu else " (olmoe layer shape, bf16)"),
         lambda: _ratios(sh([py, "bench/moe_layer.py", *shape], os.path.join(args.out, "moe_layer.log"), 240, env),
                         os.path.join(args.out, "moe_layer.log")))

    print("\n| step | result | seconds | figure |\n|---|---|---:|---|")
    for name, ok, seconds, figure in results:
        print(f"| {name} | {'ok' if ok else 'FAILED'} | {seconds:.0f} | {figure} |")
    print(f"\nlogs: {args.out}")
    return 0 if all(ok for _, ok, _, _ in results) else 1


# The top-k and VQMoE layers at the olmoe layer shape, forward and backward under CUDA's sync debug mode "error":
# any device-to-host sync in them (an .item(), nonzero, a size read from the data) raises.
SYNC_CHECK = r"""
import torch, deepspeed
from vqmoe_ds.parallel import init_single_process
init_single_process()
from vqmoe_ds.moe import MoEConfig
for kw in (dict(router="topk"), dict(router="vqmoe")):
    layer = MoEConfig(hidden_size=2048, ffn_hidden_size=1024, num_experts=64, top_k=8, activation="swiglu",
                      linear_bias=False, expert_impl="grouped", **kw).build().cuda().bfloat16().train()
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)
    for m in layer.modules():
        if hasattr(m, "set_step"):
            m.set_step(3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    y, aux = layer(x)
    (y.float().sum() + aux).backward()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    print(kw["router"], "forward+backward without a host sync")
"""


def _ratios(res, log):
    """The benchmark's grouped-GEMM / expert-loop ratios as the step's figure (its full table is in the log)."""
    ok, seconds, tail = res
    lines = open(log).read().splitlines()
    try:
        i = next(n for n, line in enumerate(lines) if line.startswith("layer fwd+bwd ms with grouped-GEMM"))
    except StopIteration:
        return ok, seconds, (tail[-1] if tail else "no output")
    ratios = []
    for line in lines[i + 1:]:
        if not line.strip():
            break
        ratios.append(" ".join(line.split()))
    return ok, seconds, "grouped / loop: " + "; ".join(ratios) + f" (table: {log})"


def _last(res):
    ok, seconds, tail = res
    return ok, seconds, (tail[-1] if tail else "no output")


if __name__ == "__main__":
    sys.exit(main())
