#!/usr/bin/env python
"""Sample text from a checkpoint of pretrain_vqmoe.py (one process, on the CPU).

    python tools/generate.py --load runs/demo/checkpoints [--tag best] --prompt "12 + 7 = " --tokens 200

Without --tag the ``best`` checkpoint is used, or ``latest`` (with a notice) when the run saved no best.  The
checkpoint is verified (every file against its recorded size and checksum), and the model rebuilt from its
stored config with expert parallelism 1; DeepSpeed's ``load_checkpoint`` gathers all experts into it (its expert
files are named by global expert id, so a checkpoint written at ep_size 2 loads at 1).  The prompt is encoded and
the sample decoded with the tokenizer the checkpoint recorded (bytes, characters, words or sentencepiece; or
``--tokenizer-meta PREFIX.tokenizer.json``).  Transformer-XL samples with its memory: the prompt once, then one
token at a time.  Tokens are sampled among the tokenizer's ids only (a model's vocabulary can be padded beyond
them).  ``--weights FILE.safetensors`` samples from an exported model instead, after checking it against its
``FILE.sha256.json`` (the tokenizer its ``FILE.json`` records when that is bytes, else ``--tokenizer-meta``).
"""
import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see tools/generate.py --help)", file=sys.stderr)
        sys.exit(2)


def parse(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="the --save folder of a run (or a run's --out-dir)")
    p.add_argument("--weights", help="instead of --load: FILE.safetensors written by tools/export_checkpoint.py")
    p.add_argument("--tag", help="checkpoint tag: best, step<N>, or latest (default: best, else latest with a notice)")
    p.add_argument("--tokenizer-meta", help="PREFIX.tokenizer.json of the data (default: the checkpoint's tokenizer)")
    p.add_argument("--prompt", default="\n", help="text the sample continues (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (default 0.8)")
    p.add_argument("--top-k", type=int, default=20, help="sample among the k most likely tokens; 0: all (default 20)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    problems = [(bool(args.load) == bool(args.weights),
                 "give exactly one of --load (a checkpoint folder) and --weights (an exported file)"),
                (args.tokens < 1, f"--tokens {args.tokens} must be >= 1"),
                (not args.temperature > 0, f"--temperature {args.temperature} must be > 0 (small values: near-greedy)"),
                (args.top_k < 0, f"--top-k {args.top_k} must be >= 0 (0: all tokens)"),
                (args.prompt == "", "--prompt is empty: give at least one character")]
    for bad, message in problems:
        if bad:
            p.error(message)
    return args


def load(args):
    """(model, config, tokenizer)."""
    from vqmoe_ds.checkpoint import load_exported, load_for_inference, read_run, tokenizer_for
    from vqmoe_ds.data import TokenizerMeta
    from vqmoe_ds.data.tokenizers import ByteTokenizer, Tokenizer

    if args.weights:
        import json

        from vqmoe_ds.checkpoint import CheckpointError

        model, cfg = load_exported(args.weights)  # verifies the export against its manifest first
        if args.tokenizer_meta:
            return model, cfg, Tokenizer.from_metadata(TokenizerMeta.load(args.tokenizer_meta))
        with open(os.path.splitext(args.weights)[0] + ".json") as f:
            recorded = json.load(f).get("tokenizer") or {}
        if recorded.get("kind", "byte") != "byte" or cfg.vocab_size != 256:
            raise CheckpointError(f"{args.weights} holds a model of {cfg.vocab_size} tokens, tokenized as "
                                  f"{recorded.get('kind', 'unknown')}: pass --tokenizer-meta PREFIX.tokenizer.json of "
                                  f"its data")
        return model, cfg, ByteTokenizer()
    from vqmoe_ds.checkpoint.export import pick_tag

    tag, notice = pick_tag(args.load, args.tag)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    run = read_run(args.load, tag)  # verifies the checkpoint first
    tok = tokenizer_for(run, args.tokenizer_meta)
    model, cfg, _ = load_for_inference(run.save_dir, run.tag, run=run)  # verified once, by read_run
    return model, cfg, tok


def sample(model, cfg, tok, args) -> str:
    import torch

    torch.manual_seed(args.seed)
    ids = [int(i) for i in tok.encode(args.prompt)]
    if not ids:
        raise ValueError(f"the prompt {args.prompt!r} encodes to no tokens with the {type(tok).__name__}: give other text")
    out, mems = list(ids), None
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(args.tokens):
            if cfg.model == "gpt":
                logits = model(torch.tensor([out[-cfg.seq_len:]]))[0]
            else:
                logits, _, _, mems = model(x, mems=mems)
            logits = logits[0, -1, :tok.vocab_size].float() / args.temperature  # ids the tokenizer can decode
            if args.top_k:
                kth = torch.topk(logits, min(args.top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1))
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return tok.decode(out)


def main(argv=None):
    args = parse(argv)
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.data import DataError
    from vqmoe_ds.parallel import shutdown

    try:
        model, cfg, tok = load(args)
        print(sample(model, cfg, tok, args))
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(clean=False)
    return 0


def cli() -> None:
    """The console script ``vqmoe-generate`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
