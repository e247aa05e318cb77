#!/usr/bin/env python
"""Speed of a full training step (forward, backward, optimizer; the driver's own `Trainer.train_step`) per
router, on the tiny and base shapes, at 1 rank and at 2 ranks with expert parallelism 2.

Reports tokens/s and achieved FLOP/s (`flops_per_token(causal=True)` x tokens/s: every matrix product, causal
attention counted at the products a causal kernel computes) and the MFU: achieved FLOP/s over the hardware peak,
here the fp32 matmul peak of the cores the ranks use (ranks x a 1-thread torch.mm peak measured in the same run,
1 thread per rank as the ranks run).  On a GPU the peak would be its datasheet bf16 dense figure.

    python bench/train_step.py [--shapes tiny base] [--routers dense topk xmoe stablemoe smoe_dropout vqmoe]
                               [--steps 5] [--warmup 2]

Numbers are only meaningful on an otherwise idle machine; nothing here is asserted.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

SHAPES = {  # driver flags of each shape
    "tiny": ["--config", "tiny", "--micro-batch-size", "8"],
    "base": ["--config", "base", "--seq-length", "256", "--micro-batch-size", "4"],
}


def mm_peak(threads: int, n: int = 1024, reps: int = 8, trials: int = 5) -> float:
    """Best of ``trials`` timings of ``reps`` fp32 n x n matmuls (the best: other load only slows it)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def worker(args):
    import torch.distributed as dist

    from vqmoe_ds.cli import ConfigError
    from vqmoe_ds.models import flops_per_token
    from vqmoe_ds.training.lm import command_line, make_task
    from vqmoe_ds.training.loop import Trainer

    results = []
    for router in args.routers:
        extra = ["--moe-expert-parallel-size", str(args.ep)] if router != "dense" else []
        if router == "smoe_dropout":  # a fixed k = 2 like the others (its schedule would change k per step)
            extra += ["--smoe-dropout-k-start", "2", "--smoe-dropout-k-end", "2"]
        argv = SHAPES[args.shape] + ["--router", router, *extra, "--train-iters", str(args.warmup + args.steps + 1),
                                     "--corpus-bytes", "400000", "--no-progress", "--no-plots",
                                     "--out-dir", os.path.join(args.tmp, router), "--deepspeed_config",
                                     os.path.join(ROOT, "ds_configs", "cpu_fp32.json")]
        try:
            cmd = command_line()
            tr = Trainer(make_task(cmd.parse(argv)), cmd)
        except ConfigError as e:  # refused before any step, the same on every rank
            results.append({"router": router, "error": str(e)})
            continue
        for _ in range(args.warmup):
            tr.train_step()
        dist.barrier()
        t = time.perf_counter()
        tokens = 0
        for _ in range(args.steps):
            tokens += tr.train_step()[2]["tokens"] * tr.world
        dist.barrier()
        dt = time.perf_counter() - t
        results.append({"router": router, "tokens_per_s": tokens / dt, "flops_per_s": tokens / dt * flops_per_token(tr.task.model_config, causal=True),
                        "step_s": dt / args.steps, "tokens_per_step": tokens // args.steps})
        tr.log.close()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--routers", nargs="+", default=["dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from vqmoe_ds.training.launch import env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

    peak1 = mm_peak(1)
    print(f"hardware peak: torch.mm fp32 {peak1 / 1e9:.1f} GFLOP/s measured on 1 core; a run's peak = ranks x that")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for ranks in (1, 2):
                cmd = torchrun_cmd(ranks, ["--worker", "--shape", shape, "--ep", str(ranks), "--tmp", tmp,
                                           "--steps", str(args.steps), "--warmup", str(args.warmup),
                                           "--routers", *args.routers], free_port(), script=os.path.abspath(__file__))
                before = shm_files()
                r = subprocess.run(cmd, env=env_for_ranks(tmp), capture_output=True, text=True, cwd=ROOT)
                remove_new_shm(before)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(f"{shape} x{ranks}: failed\n{(r.stdout + r.stderr)[-3000:]}")
                    continue
                for res in json.loads(line[0][7:]):
                    rows.append((shape, ranks, res))
    print(f"\n{'shape':6} {'ranks':>5} {'router':13} {'tok/step':>8} {'step ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'MFU (ranks x 1-core fp32 mm peak)':>34}")
    for shape, ranks, r in rows:
        if "error" in r:
            print(f"{shape:6} {ranks:>5} {r['router']:13} refused: {r['error']}")
            continue
        print(f"{shape:6} {ranks:>5} {r['router']:13} {r['tokens_per_step']:>8} {r['step_s'] * 1e3:>8.0f} "
              f"{r['tokens_per_s']:>9.0f} {r['flops_per_s'] / 1e9:>8.2f} {r['flops_per_s'] / (peak1 * ranks):>34.1%}")


if __name__ == "__main__":
    sys.exit(main())
