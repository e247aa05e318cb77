#!/usr/bin/env python
"""Peak memory per rank of a few training steps at ZeRO 1 and ZeRO 2 on 2 CPU ranks, against
``tools/estimate_memory.py``'s per-rank figure for the same run.

    python bench/zero_memory.py [--config large] [--stages 1 2] [--ep 2] [--steps 3] [--micro-batch 2]

Each run is ``torchrun --nproc_per_node=2 pretrain_vqmoe.py`` (fp32, torch Adam, ``ds_configs/cpu_fp32.json`` with
the stage set) in a process of its own.  Measured per rank: the kernel's peak resident set (``VmHWM`` of
/proc/PID/status, read every 50 ms while the rank lives; the last reading before exit is its peak), and as a
cross-check ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the wrapper (the largest peak of any rank).  The same run
of ``--config tiny`` measures what a rank holds with a negligible model (Python, torch, DeepSpeed, the data, the
communication buffers): the estimate's ``--framework-gib`` term.  Writes bench/results/zero_memory.json.

Measured 2026-11-29 (large, 214.9M parameters, micro-batch 2 x 512, fp32; framework 0.414 GiB), peak per rank
against the estimate: ep 2 ZeRO 1 4.468 / 4.475 GiB vs 4.354 (0.97), ZeRO 2 4.177 / 4.205 vs 4.305 (1.02); ep 1
ZeRO 1 5.728 / 5.958 vs 5.856 (0.98), ZeRO 2 4.822 / 5.239 vs 5.056 (0.97).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30

WRAPPER = r"""
import json, os, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
peaks, out = {}, []
import threading
def read():
    for line in p.stdout:
        out.append(line)
t = threading.Thread(target=read, daemon=True); t.start()
def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
while p.poll() is None:
    for c in children(p.pid):
        try:
            with open(f"/proc/{c}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks[c] = int(line.split()[1]) * 1024
        except OSError:
            pass
    time.sleep(0.05)
t.join(5)
print(json.dumps({"rc": p.returncode, "peaks": sorted(peaks.values()),
                  "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "tail": "".join(out)[-3000:]}))
"""


def run(config, stage, ep, steps, micro, tmp):
    from vqmoe_ds.training.launch import env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

    with open(os.path.join(ROOT, "ds_configs", "cpu_fp32.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"] = {"stage": stage}
    ds_path = os.path.join(tmp, f"ds_{stage}.json")
    with open(ds_path, "w") as f:
        json.dump(ds, f)
    out = os.path.join(tmp, f"{config}_{stage}_{ep}")
    args = ["--config", config, "--deepspeed_config", ds_path, "--train-iters", str(steps), "--micro-batch-size",
            str(micro), "--eval-iters", "1", "--test-iters", "1", "--corpus-bytes", "300000", "--no-progress",
            "--no-plots", "--log-interval", "1", "--moe-expert-parallel-size", str(ep),
            "--out-dir", out]
    before = shm_files()
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(torchrun_cmd(2, args, free_port()))],
                           env=env_for_ranks(tmp), capture_output=True, text=True, cwd=ROOT)
    finally:
        remove_new_shm(before)
        subprocess.run(["rm", "-rf", out])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"{config} ZeRO {stage} failed:\n{res['tail']}")
    res["seconds"] = time.time() - t0
    return res


def estimate(config, stage, ep, micro, framework_gib):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "estimate_memory.py"), "--config", config, "--zero", str(stage),
           "--ep", str(ep), "--gpus", "2", "--micro-batch", str(micro), "--dtype", "fp32", "--framework-gib",
           str(framework_gib), "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="large")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=2)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in a.stages:
            base = run("tiny", stage, a.ep, a.steps, a.micro_batch, tmp)
            framework = max(base["peaks"]) / GiB
            big = run(a.config, stage, a.ep, a.steps, a.micro_batch, tmp)
            est = estimate(a.config, stage, a.ep, a.micro_batch, round(framework, 3))
            measured = max(big["peaks"]) / GiB
            row = {"config": a.config, "zero": stage, "ep": a.ep, "micro_batch": a.micro_batch,
                   "measured_peak_gib_per_rank": [round(p / GiB, 3) for p in big["peaks"]],
                   "maxrss_children_gib": round(big["maxrss_children"] / GiB, 3),
                   "framework_gib (tiny run peak)": round(framework, 3), "estimate": est,
                   "estimate_over_measured": round(est["total_gib"] / measured, 3), "seconds": round(big["seconds"])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "zero_memory.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
