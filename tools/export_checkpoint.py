#!/usr/bin/env python
"""Export a checkpoint of pretrain_vqmoe.py to one framework-neutral file: all weights and buffers (every
expert of every MoE layer gathered, expert parallelism 1) in safetensors, plus the model config as JSON.

    python tools/export_checkpoint.py --load runs/demo/checkpoints [--tag best] --out runs/demo/model.safetensors

writes ``model.safetensors`` and ``model.json``.  ``tools/generate.py --weights model.safetensors`` samples from
it; ``vqmoe_ds.checkpoint.load_exported`` rebuilds the model.  Any reader of safetensors (numpy,
JAX, Rust) can read the tensors; their names are those of the PyTorch modules.

    python tools/export_checkpoint.py --format hf --load runs/olmoe/checkpoints --tag latest --out runs/olmoe/hf

writes a Hugging Face folder (config.json, model.safetensors or shards, the tokenizer of an imported model) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as OlmoeForCausalLM; models of OLMoE's block only.
"""
import argparse
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
    p.add_argument("--out", required=True, help="FILE.safetensors (FILE.json is written beside it); --format hf: a folder")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors (default): one file named as our modules; hf: a Hugging Face OlmoeForCausalLM folder")
    args = p.parse_args(argv)
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.checkpoint.export import export_safetensors
    from vqmoe_ds.data.errors import DataError, require_output
    from vqmoe_ds.parallel import shutdown

    try:
        if args.format == "hf":
            from vqmoe_ds.checkpoint.hf import export_hf

            n = export_hf(args.load, args.tag, args.out)
        else:
            require_output(args.out, "--out", "file")
            n = export_safetensors(args.load, args.tag, args.out)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(clean=False)
    if args.format == "hf":
        print(f"wrote {args.out} ({n['tensors']} tensors in {n['shards']} file(s), OlmoeForCausalLM)")
    else:
        print(f"wrote {args.out} ({n['tensors']} tensors) and {os.path.splitext(args.out)[0]}.json")
    return 0


if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
