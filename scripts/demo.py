#!/usr/bin/env python
"""`make demo`: train a small VQMoE language model on 2 CPU ranks for ~2-3 minutes, evaluate it, plot it.

1. writes the default synthetic corpus (vqmoe_ds.data.default_corpus: arithmetic, English, code, DNA and
   key-value records interleaved -- no download) to runs/demo/corpus.txt;
2. launches ``torchrun --nproc_per_node=2 pretrain_vqmoe.py`` with a VQMoE GPT (4 layers, d 128, 8 experts
   split over the 2 ranks by expert parallelism, codebook of 16) on ds_configs/cpu_fp32.json;
3. prints the validation loss and test bits per character, and where the logs, TensorBoard files, plots and
   checkpoints are.

    python scripts/demo.py [--steps 400] [--out-dir runs/demo]
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

from vqmoe_ds.data.default_corpus import generate  # noqa: E402
from vqmoe_ds.training.launch import env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    corpus = os.path.join(args.out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(generate(args.corpus_bytes, seed=0))
    print(f"corpus: {corpus} ({args.corpus_bytes} bytes of the default synthetic corpus)", flush=True)
    for name in ("log.jsonl",):  # a fresh log for this run
        if os.path.exists(os.path.join(args.out_dir, name)):
            os.remove(os.path.join(args.out_dir, name))
    driver_args = [
        "--model", "gpt", "--config", "tiny", "--num-layers", "4", "--hidden-size", "128",
        "--num-attention-heads", "4", "--ffn-hidden-size", "256", "--seq-length", "128",
        "--router", "vqmoe", "--num-experts", "8", "--top-k", "2", "--codebook-size", "16",
        "--moe-expert-parallel-size", "2", "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_fp32.json"),
        "--micro-batch-size", "16", "--train-iters", str(args.steps), "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-warmup-iters", "20", "--eval-interval", str(max(1, args.steps // 4)), "--eval-iters", "20",
        "--test-iters", "0", "--log-interval", "10", "--data-file", corpus, "--out-dir", args.out_dir,
        "--overwrite",  # the demo replaces its own earlier run
        "--save", os.path.join(args.out_dir, "checkpoints")]
    cmd = torchrun_cmd(2, driver_args, free_port())
    print("running:", " ".join(cmd), flush=True)
    before, t0 = shm_files(), time.time()
    with tempfile.TemporaryDirectory() as tmp:  # torchrun's torchelastic_* folders go here and are removed
        try:
            rc = subprocess.call(cmd, env=env_for_ranks(tmp, threads=1), cwd=ROOT)
        finally:
            remove_new_shm(before)
    if rc != 0:
        print(f"demo: training failed with exit code {rc}", file=sys.stderr)
        return rc
    with open(os.path.join(args.out_dir, "results.json")) as f:
        res = json.load(f)
    print(f"\ndemo done in {time.time() - t0:.0f} s: best validation loss {res['best_valid']['loss']:.4f} nats/token, "
          f"test {res['test']['bpc']:.4f} bits/char (ASCII bytes: a token is a character; a uniform guess is 8.0), "
          f"test token perplexity {res['test']['token_ppl']:.3f}")
    print(f"plots: {', '.join(os.path.join(args.out_dir, n) for n in ('loss.png', 'expert_load.png', 'code_usage.png'))}")
    print(f"log: {os.path.join(args.out_dir, 'log.jsonl')}; TensorBoard: tensorboard --logdir "
          f"{os.path.join(args.out_dir, 'tensorboard')}")
    print(f"sample text: python tools/generate.py --load {os.path.join(args.out_dir, 'checkpoints')} "
          f"--prompt '12 + 7 = '")
    return 0


if __name__ == "__main__":
    sys.exit(main())
