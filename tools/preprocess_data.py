#!/usr/bin/env python
r"""Tokenize train/valid/test text into megatron-core indexed datasets (.bin/.idx) plus tokenizer metadata.

    # byte level (enwik8), char level (text8)
    python tools/preprocess_data.py --input data/enwik8 --tokenizer byte --output-prefix data/enwik8/byte
    python tools/preprocess_data.py --input data/text8  --tokenizer char --output-prefix data/text8/char
    # word level, Transformer-XL style (WikiText-103): vocabulary from train, <eos> per line
    python tools/preprocess_data.py --input data/wikitext-103 --tokenizer word --output-prefix data/wikitext-103/word
    # sentencepiece (lm1b, any corpus): train the model first with tools/train_tokenizer.py
    python tools/preprocess_data.py --input data/lm1b --tokenizer sentencepiece --sp-model data/lm1b/sp32k.model \
        --output-prefix data/lm1b/sp32k --workers 8
    # a Hugging Face model's tokenizer (e.g. an OLMoE imported with tools/convert_hf.py --out-dir runs/olmoe)
    python tools/preprocess_data.py --input data/wikitext-103 --tokenizer hf --hf-tokenizer runs/olmoe/tokenizer \
        --output-prefix data/wikitext-103/olmoe

--input DIR takes DIR/train.txt, valid.txt, test.txt (those present; train is needed for char/word);
--train/--valid/--test name files directly.  The output prefix is the --data-path of training.
PREFIX.tokenizer.json records, per split, the tokens and the UTF-8 bytes, characters, words and lines of its
text: what the training driver converts its loss with (bits per byte/character, word-level perplexity).
"""
import argparse
import os
import sys
import time


from vqmoe_ds.data.errors import DataError  # noqa: E402
from vqmoe_ds.data.tool_help import HelpFormatter  # noqa: E402
from vqmoe_ds.data.preprocess import SPLITS, PreprocessConfig, preprocess_corpus  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", default=None, help="folder holding train.txt / valid.txt / test.txt")
    for s in SPLITS:
        p.add_argument(f"--{s}", default=None, help=f"the {s} text file (instead of --input's)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.<split>.bin/.idx and PREFIX.tokenizer.json")
    p.add_argument("--tokenizer", required=True, choices=("byte", "char", "word", "sentencepiece", "hf"),
                   help="what a token is (docs/data.md)")
    p.add_argument("--sp-model", default=None, help="sentencepiece: the .model of tools/train_tokenizer.py")
    p.add_argument("--hf-tokenizer", default=None,
                   help="hf: a Hugging Face tokenizer.json or its folder (an imported model's OUT/tokenizer)")
    p.add_argument("--min-count", type=int, default=1, help="word: train words seen fewer times become <unk>")
    p.add_argument("--dtype", default=None, help="token dtype of the .bin (None: the smallest that fits)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizing processes (byte: always 1)")
    p.add_argument("--block-bytes", type=int, default=1 << 20, help="bytes of text per work item")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not on a terminal)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        splits = {}
        for s in SPLITS:
            if getattr(args, s):
                splits[s] = getattr(args, s)
            elif args.input and os.path.exists(os.path.join(args.input, f"{s}.txt")):
                splits[s] = os.path.join(args.input, f"{s}.txt")
        if args.input and not os.path.isdir(args.input):
            raise DataError(f"--input {args.input} is not a folder: give the folder get_data.py wrote, or --train FILE")
        cfg = PreprocessConfig(tokenizer=args.tokenizer, workers=args.workers, block_bytes=args.block_bytes,
                               min_count=args.min_count, sp_model=args.sp_model, hf_tokenizer=args.hf_tokenizer,
                               dtype=args.dtype,
                               progress=not args.no_progress and sys.stderr.isatty())  # a bar on a terminal only
        t0 = time.time()
        meta = preprocess_corpus(splits, args.output_prefix, cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from vqmoe_ds.data.token_stream import IndexedTokenStream

    print(f"{args.output_prefix}.tokenizer.json\t{meta.kind} vocab_size={meta.vocab_size} dtype={meta.dtype}")
    for s in splits:
        print(f"{args.output_prefix}.{s}.bin\t{len(IndexedTokenStream(f'{args.output_prefix}.{s}'))} tokens")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


def cli() -> None:
    """The console script ``vqmoe-preprocess-data`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
