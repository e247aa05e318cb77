#!/usr/bin/env python
"""Export a checkpoint of pretrain_vqmoe.py to one framework-neutral file: all weights and buffers (every
expert of every MoE layer gathered, expert parallelism 1) in safetensors, plus the model config as JSON.

    python tools/export_checkpoint.py --load runs/demo/checkpoints [--tag best] --out runs/demo/model.safetensors

writes ``model.safetensors`` and ``model.json``.  ``tools/generate.py --weights model.safetensors`` samples from
it; ``vqmoe_ds.training.checkpoint.load_exported`` rebuilds the model.  Any reader of safetensors (numpy,
JAX, Rust) can read the tensors; their names are those of the PyTorch modules.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the --save folder of a run")
    p.add_argument("--tag", default="best", help="best (default), step<N> or latest")
    p.add_argument("--out", required=True, help="FILE.safetensors (FILE.json is written beside it)")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out} must end in .safetensors: name the file like model.safetensors",
              file=sys.stderr)
        return 2
    import torch.distributed as dist
    from safetensors.torch import save_file

    from vqmoe_ds.training import checkpoint as ckpt

    try:
        model, cfg, tag = ckpt.load_for_inference(args.load, args.tag)
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen = {}
    for k, v in list(state.items()):  # tied weights: safetensors refuses shared storage, store copies
        key = (v.data_ptr(), v.shape, v.stride())
        if v.numel() and key in seen:
            state[k] = v.clone()
        seen[key] = k
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.join(args.load, tag)})
    os.replace(tmp, args.out)
    meta = {"model_config": cfg.to_dict(), "source": os.path.abspath(os.path.join(args.load, tag)),
            "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out} ({len(state)} tensors) and {os.path.splitext(args.out)[0]}.json")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
