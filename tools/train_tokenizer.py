#!/usr/bin/env python
r"""Train a SentencePiece BPE or unigram model on a training text (never on valid/test).

    python tools/train_tokenizer.py --input data/lm1b/train.txt --model-prefix data/lm1b/sp32k \
        --vocab-size 32000 --model-type bpe --input-sentence-size 5000000

Writes PREFIX.model and PREFIX.vocab.  The model has <unk>=0, <s>=1, </s>=2 (the end-of-line token the
preprocessing appends to every line) and no padding id.  Very large corpora are sampled
(--input-sentence-size lines, shuffled) as SentencePiece recommends.

--user-defined-symbols S ... makes each string one piece wherever it occurs in the text.  WikiText-103 marks
its rare words with the literal text <unk>, which SentencePiece would otherwise cut into pieces ('<', 'unk',
'>'):

    python tools/train_tokenizer.py --input data/wikitext-103/train.txt --model-prefix data/wikitext-103/sp32k \
        --vocab-size 32000 --user-defined-symbols "<unk>"

A symbol equal to SentencePiece's own unknown piece (<unk>) renames that piece to <sp_unk> (still id 0), so
the text's <unk> is a piece of its own.
"""
import argparse
import tempfile
import os
import sys


from vqmoe_ds.data.errors import DataError, require_text_file  # noqa: E402
from vqmoe_ds.data.tool_help import HelpFormatter  # noqa: E402


SP_UNK = "<unk>"  # SentencePiece's default unknown piece
RENAMED_UNK = "<sp_unk>"  # its name when the text's own "<unk>" is a user-defined symbol


def train(inputs, model_prefix, vocab_size, model_type="bpe", character_coverage=1.0,
          input_sentence_size=10_000_000, byte_fallback=False, threads=1, seed_sentencepiece_size=1_000_000,
          user_defined_symbols=()):
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: choose bpe or unigram")
    if vocab_size < 8:
        raise DataError(f"--vocab-size {vocab_size} is too small: use at least 8 (specials + some pieces)")
    symbols = list(dict.fromkeys(user_defined_symbols or ()))
    bad = [u for u in symbols if not u or u.isspace() or u in ("<s>", "</s>", RENAMED_UNK)]
    if bad:
        raise DataError(f"--user-defined-symbols {bad[0]!r} cannot be a symbol (empty, whitespace or one of "
                        f"SentencePiece's <s>, </s>, {RENAMED_UNK}): give the text's own markers, like <unk>")
    unk_piece = RENAMED_UNK if SP_UNK in symbols else SP_UNK
    for f in inputs:
        require_text_file(f, what="tokenizer training file", fix="give the train split's text file")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    log = tempfile.TemporaryFile("w+")  # sentencepiece writes its log to a real file descriptor
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, byte_fallback=byte_fallback, num_threads=threads,
            seed_sentencepiece_size=seed_sentencepiece_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=symbols, unk_piece=unk_piece, logstream=log)
    except RuntimeError as e:  # sentencepiece's trainer reports every failure as a RuntimeError; its text is kept
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fix = "lower --vocab-size or give more text" if "vocab" in msg.lower() else "see sentencepiece's reason"
        raise DataError(f"sentencepiece could not train on {','.join(inputs)} ({msg}): {fix}") from None
    finally:
        log.close()
    return model_prefix + ".model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="training text file(s): the train split only")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary, specials included")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece's algorithm")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="share of the characters the pieces must cover (rarer characters become <unk>)")
    p.add_argument("--input-sentence-size", type=int, default=10_000_000,
                   help="lines sampled (shuffled) from the input to train on")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte pieces, not <unk>")
    p.add_argument("--user-defined-symbols", nargs="+", default=[], metavar="SYMBOL",
                   help="strings that are always one piece, e.g. WikiText's literal \"<unk>\"")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="training threads")
    a = p.parse_args(argv)
    try:
        model = train(a.input, a.model_prefix, a.vocab_size, a.model_type, a.character_coverage,
                      a.input_sentence_size, a.byte_fallback, a.threads, user_defined_symbols=a.user_defined_symbols)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if SP_UNK in a.user_defined_symbols:
        print(f"note: the text's {SP_UNK} is one user-defined piece; SentencePiece's unknown piece (id 0) is "
              f"named {RENAMED_UNK}")
    print(model)
    return 0


def cli() -> None:
    """The console script ``vqmoe-train-tokenizer`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
