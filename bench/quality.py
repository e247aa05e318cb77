#!/usr/bin/env python
"""Validation BPC of the tiny model with each router after the same number of steps on one text file.

    python bench/quality.py /work/shared/data/warpeace.txt [--steps 300] [--ranks 2]
        [--routers dense topk xmoe stablemoe smoe_dropout vqmoe]

Each router is one run of pretrain_vqmoe.py (byte-level, the file split 90/5/5 in order), same seed, same
data order, same lr schedule; the table lists the final validation and test BPC (whole splits).  A single
short run per router: differences of a few hundredths are within seed noise.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vqmoe_ds.training.launch import env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text_file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--routers", nargs="+", default=["dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe"])
    p.add_argument("--extra", default="", help="more driver flags, one string")
    a = p.parse_args()
    if not os.path.isfile(a.text_file):
        print(f"error: {a.text_file} does not exist: give a text file", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for router in a.routers:
            out = os.path.join(tmp, router)
            flags = ["--config", "tiny", "--router", router, "--data-file", os.path.abspath(a.text_file),
                     "--train-iters", str(a.steps), "--lr", "3e-3", "--lr-warmup-iters", str(max(1, a.steps // 20)),
                     "--micro-batch-size", "16", "--eval-iters", "0", "--test-iters", "0",
                     "--log-interval", str(max(1, a.steps // 10)), "--no-progress", "--no-plots", "--out-dir", out,
                     "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_fp32.json"),
                     "--smoe-dropout-k-start", "1", "--smoe-dropout-k-end", "4", "--smoe-dropout-k-steps", str(a.steps),
                     "--stablemoe-stage1-steps", str(a.steps // 2), *a.extra.split()]
            if router != "dense" and a.ranks > 1:
                flags += ["--moe-expert-parallel-size", str(a.ranks)]
            before = shm_files()
            r = subprocess.run(torchrun_cmd(a.ranks, flags, free_port()), env=env_for_ranks(tmp), capture_output=True,
                               text=True, cwd=ROOT)
            remove_new_shm(before)
            if r.returncode:
                print(f"{router}: failed\n{(r.stdout + r.stderr)[-3000:]}")
                continue
            recs = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
            valid = [x for x in recs if x["kind"] == "valid"][-1]
            test = [x for x in recs if x["kind"] == "test"][-1]
            train = [x for x in recs if x["kind"] == "train"]
            tok_s = sum(x["tokens_per_s"] for x in train) / len(train)
            rows.append((router, valid["bpc"], test["bpc"], tok_s))
            print(f"{router}: valid BPC {valid['bpc']:.4f}", flush=True)
    print(f"\n{a.text_file}, tiny model, {a.steps} steps, {a.ranks} rank(s)")
    print(f"{'router':13} {'valid BPC':>9} {'test BPC':>9} {'tokens/s':>9}")
    for router, v, t, s in rows:
        print(f"{router:13} {v:>9.4f} {t:>9.4f} {s:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
