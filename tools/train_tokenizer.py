#!/usr/bin/env python
"""Train a SentencePiece BPE or unigram model on a training text (never on valid/test).

    python tools/train_tokenizer.py --input data/lm1b/train.txt --model-prefix data/lm1b/sp32k \
        --vocab-size 32000 --model-type bpe --input-sentence-size 5000000

Writes PREFIX.model and PREFIX.vocab.  The model has <unk>=0, <s>=1, </s>=2 (the end-of-line token the
preprocessing appends to every line) and no padding id.  Very large corpora are sampled
(--input-sentence-size lines, shuffled) as SentencePiece recommends.
"""
import argparse
import tempfile
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqmoe_ds.data.errors import DataError, require_text_file  # noqa: E402


def train(inputs, model_prefix, vocab_size, model_type="bpe", character_coverage=1.0,
          input_sentence_size=10_000_000, byte_fallback=False, threads=1, seed_sentencepiece_size=1_000_000):
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: choose bpe or unigram")
    if vocab_size < 8:
        raise DataError(f"--vocab-size {vocab_size} is too small: use at least 8 (specials + some pieces)")
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
            logstream=log)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"sentencepiece could not train on {','.join(inputs)} ({msg}): lower --vocab-size or give "
                        f"more text") from None
    finally:
        log.close()
    return model_prefix + ".model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=10_000_000)
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte pieces, not <unk>")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    a = p.parse_args(argv)
    try:
        model = train(a.input, a.model_prefix, a.vocab_size, a.model_type, a.character_coverage,
                      a.input_sentence_size, a.byte_fallback, a.threads)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
