#!/usr/bin/env python
"""Sample text from a checkpoint of pretrain_vqmoe.py (one process, CPU or one GPU).

    python tools/generate.py --load runs/demo/checkpoints [--tag best] --prompt "12 + 7 = " --tokens 200

The checkpoint is verified, and the model rebuilt from its stored config with expert parallelism 1; DeepSpeed's
``load_checkpoint`` gathers all experts into it (its expert files are named by global expert id, so a
checkpoint written at ep_size 2 loads at 1).  Byte-level models print text; others print token ids.
Transformer-XL samples with its memory: the prompt once, then one token at a time.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="the --save folder of a run")
    p.add_argument("--weights", help="instead of --load: FILE.safetensors written by tools/export_checkpoint.py")
    p.add_argument("--tag", default="best", help="checkpoint tag: best (default), step<N>, or 'latest'")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if bool(args.load) == bool(args.weights):
        print("error: give exactly one of --load (a checkpoint folder) and --weights (an exported file)",
              file=sys.stderr)
        return 2
    from vqmoe_ds.checkpoint import CheckpointError, load_exported, load_for_inference

    try:
        if args.weights:
            model, cfg = load_exported(args.weights)
        else:
            model, cfg, _ = load_for_inference(args.load, args.tag)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return sample(model, cfg, args)


def sample(model, cfg, args):
    import torch
    import torch.distributed as dist

    torch.manual_seed(args.seed)
    byte_level = cfg.vocab_size == 256
    ids = list(args.prompt.encode("utf-8")) if byte_level else [int(t) for t in args.prompt.split()]
    out, mems = list(ids), None
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(args.tokens):
            if cfg.model == "gpt":
                logits = model(torch.tensor([out[-cfg.seq_len:]]))[0]
            else:
                logits, _, _, mems = model(x, mems=mems)
            logits = logits[0, -1].float() / max(args.temperature, 1e-5)
            if args.top_k:
                kth = torch.topk(logits, min(args.top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1))
            out.append(nxt)
            x = torch.tensor([[nxt]])
    print(bytes(out).decode("utf-8", errors="replace") if byte_level else " ".join(map(str, out)))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
