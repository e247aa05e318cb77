#!/usr/bin/env python
"""Evaluate any checkpoint as a language model on any data: every metric of the driver's validation and test lines
(loss in nats/token, bits per token, token perplexity; with the split's text counts bits per byte and per character
and word perplexity), over the whole split by default.

    python tools/evaluate.py --load runs/olmoe_vq --data-path data/wikitext-103/olmoe [--split valid test] \\
        [--discrete-only] [--out eval.json]

--load takes a run's --out-dir, its checkpoints folder or one tag folder (--tag picks a tag; default: the latest):
a pretraining run, an imported Hugging Face model (tools/convert_hf.py), a converted VQMoE
(tools/convert_to_vqmoe.py), at any expert-parallel size.  The data: --data-path (preprocessed with the model's
tokenizer: its tokenizer is checked against the one the checkpoint recorded), --text-file (bytes; byte-level models
only), else the run's own data.  --discrete-only evaluates a VQMoE through its discrete path alone (eq. 7).  The
checkpoint is verified first; one process, on the CPU.  The model sees the split in windows of its context
(--seq-length to shorten them; Transformer-XL: segments with memory), every token once, the last batch's padding
masked: the numbers equal the driver's for the same split and window.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see tools/evaluate.py --help)", file=sys.stderr)
        sys.exit(2)


def parse(argv=None):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="a run's --out-dir, its checkpoints folder or a tag folder")
    ap.add_argument("--tag", help="checkpoint tag (default: the latest)")
    ap.add_argument("--run-config", help="the run's config.json if not beside its checkpoints folder")
    ap.add_argument("--data-path", help="PREFIX of preprocessed data (tools/preprocess_data.py)")
    ap.add_argument("--text-file", help="a text file read as bytes, split 90/5/5 (byte-level models)")
    ap.add_argument("--split", nargs="+", choices=("train", "valid", "test"),
                    help="splits to evaluate (default: valid and test, those present)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ap.add_argument("--seq-length", type=int, help="evaluation window (default: the model's context)")
    ap.add_argument("--max-batches", type=int, default=0, help="batches per split (0, the default: the whole split)")
    ap.add_argument("--discrete-only", action="store_true", help="VQMoE layers run their discrete path only (eq. 7)")
    ap.add_argument("--out", help="JSON file with the results")
    a = ap.parse_args(argv)
    if a.data_path and a.text_file:
        ap.error("--data-path and --text-file both given: choose one")
    for name in ("batch_size", "seq_length"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.max_batches < 0:
        ap.error(f"--max-batches {a.max_batches} must be >= 0 (0: the whole split)")
    return a


def evaluate(args):
    from vqmoe_ds.checkpoint import load_lm, read_run
    from vqmoe_ds.data import DataError
    from vqmoe_ds.data.errors import require_output
    from vqmoe_ds.finetune.discrete import absent_path_keys, discrete_only_config
    from vqmoe_ds.finetune.lm_eval import eval_corpus, held_out_loss
    from vqmoe_ds.training.lm import describe_lm_metrics

    if args.out:
        require_output(args.out, "--out", "file")
    run = read_run(args.load, args.tag, args.run_config)  # verifies the checkpoint
    corpus = eval_corpus(run, args.data_path, args.text_file)
    splits = args.split or [s for s in ("valid", "test") if s in corpus.streams]
    for s in splits:
        if s not in corpus.streams:
            raise DataError(f"the data has no {s} split ({corpus.missing.get(s)}): choose another --split")
    if not splits:
        raise DataError(f"{corpus.source} has neither a valid nor a test split: give --split train")
    cfg = run.model_config
    if cfg.model == "gpt" and args.seq_length and args.seq_length > cfg.seq_len:
        raise DataError(f"--seq-length {args.seq_length} exceeds the model's context {cfg.seq_len}: lower it")
    want, drop = None, ()
    if args.discrete_only:
        one = cfg.replace_moe(ep_size=1)
        want = discrete_only_config(one)
        drop = absent_path_keys(one, want)
    model, run, _ = load_lm(args.load, args.tag, cfg=want, run_config=args.run_config, may_drop=drop,
                            run=run)  # verified once, above
    out = {"checkpoint": run.path, "step": int(run.client_state.get("step", 0)), "data": corpus.source,
           "discrete_only": args.discrete_only, "splits": {}}
    for s in splits:
        res = held_out_loss(model, corpus, s, args.batch_size, args.seq_length, args.max_batches)
        out["splits"][s] = res
        print(f"{s} ({run.path}{', discrete path only' if args.discrete_only else ''}): {describe_lm_metrics(res)}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, allow_nan=False)
    return out


def main(argv=None):
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.data import DataError
    from vqmoe_ds.moe.config import ConfigError
    from vqmoe_ds.training.launch import run_tool

    return run_tool(evaluate, parse(argv), (CheckpointError, ConfigError, DataError, FileNotFoundError))


def cli() -> None:
    """The console script ``vqmoe-evaluate`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
