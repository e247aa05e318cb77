"""Tokenize text corpora into megatron-core's indexed format (.bin/.idx), over several processes.

Why this shape: the corpora are large (enwik8 100 MB, WikiText-103 540 MB, lm1b 4 GB) and one core is slow,
so the file is cut into blocks of about ``block_bytes`` at places the tokenizer allows (any byte for bytes,
a character boundary for chars, a line end for words and sentencepiece), the blocks are tokenized by a
``multiprocessing`` pool, and the results are written *in order* by megatron-core's ``IndexedDatasetBuilder``.
At most ``4 x workers`` blocks are in flight, so memory stays bounded whatever the corpus size.

Layout written for ``output_prefix=P`` (the ``--data-path`` the training driver takes)::

    P.tokenizer.json         TokenizerMeta (kind, vocab size, dtype, special ids, vocab file, and per split the
                             tokens, UTF-8 bytes, characters, words and lines of its text: ``text_counts``)
    P.vocab.txt              word-level vocabulary, one token per line (word only)
    P.<split>.bin / .idx     tokens of each split; one megatron "document" per block; word and sentencepiece:
                             one sequence per line, byte and char: one sequence per block (their blocks are cut
                             at any byte / character, and the models read every split as one stream anyway)

Vocabularies (char alphabet, word counts) are built on the train split only.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from .errors import DataError, require_text_file
from .metadata import TOKEN_DTYPES, TokenizerMeta, choose_dtype
from .text_counts import TextCounter, count_block
from .tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer
from .tokenizers.word import count_words

SPLITS = ("train", "valid", "test")


@dataclass
class PreprocessConfig:
    tokenizer: str = "byte"  # byte | char | word | sentencepiece | hf
    workers: int = 1
    block_bytes: int = 1 << 20
    min_count: int = 1  # word: rarer train words become <unk>
    sp_model: Optional[str] = None  # sentencepiece: the .model from tools/train_tokenizer.py
    hf_tokenizer: Optional[str] = None  # hf: a Hugging Face tokenizer.json, or the folder holding it
    dtype: Optional[str] = None  # token dtype of the .bin; None: the smallest that holds the vocabulary
    progress: bool = True

    def __post_init__(self):
        if self.tokenizer not in ("byte", "char", "word", "sentencepiece", "hf"):
            raise DataError(f"unknown --tokenizer {self.tokenizer!r}: choose byte, char, word, sentencepiece or hf")
        if self.workers < 1:
            raise DataError(f"--workers {self.workers} must be >= 1")
        if self.block_bytes < 16:
            raise DataError(f"block_bytes={self.block_bytes} must be >= 16")
        if self.dtype is not None and self.dtype not in TOKEN_DTYPES:
            raise DataError(f"--dtype {self.dtype} is not supported: choose one of {', '.join(TOKEN_DTYPES)}")
        if self.tokenizer == "sentencepiece" and not self.sp_model:
            raise DataError("--tokenizer sentencepiece needs --sp-model (train one with tools/train_tokenizer.py)")
        if self.tokenizer == "hf" and not self.hf_tokenizer:
            raise DataError("--tokenizer hf needs --hf-tokenizer (a tokenizer.json, e.g. OUT/tokenizer of "
                            "tools/convert_hf.py)")


def iter_blocks(path: str, block_bytes: int, cut: str) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(offset, block)`` covering the file exactly, each block ending where ``cut`` allows."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            eof = not data
            buf = carry + data
            if eof:
                if buf:
                    yield offset, buf
                return
            if cut == "any":
                c = len(buf)
            elif cut == "utf8":  # do not end inside a multi-byte character
                c = utf8_cut(buf)
            else:  # "line"
                c = buf.rfind(b"\n") + 1
                if c == 0:  # a line longer than the block: read on
                    carry = buf
                    continue
            yield offset, buf[:c]
            offset += c
            carry = buf[c:]


def utf8_cut(buf: bytes) -> int:
    """The length of the longest prefix of ``buf`` that does not end inside a UTF-8 character: ``len(buf)``
    unless the last character is incomplete (then where it starts; ``len(buf)`` again if that is 0, so a
    block of invalid bytes still moves on and the UTF-8 check names it)."""
    i = len(buf) - 1
    while i > 0 and len(buf) - i < 4 and (buf[i] & 0xC0) == 0x80:  # back to the last character's lead byte
        i -= 1
    lead = buf[i]
    need = next((n for n, (m, v) in enumerate(((0x80, 0), (0xE0, 0xC0), (0xF0, 0xE0), (0xF8, 0xF0)), 1)
                 if lead & m == v), 1)  # the character's length from its lead byte (1 for a stray byte)
    c = len(buf) if i + need <= len(buf) else i
    return c or len(buf)


# ---- the worker side: one tokenizer per process, set up once by the pool initializer ----
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_task(task):
    path, offset, block, dtype = task
    tokens, lengths = _WORKER_TOKENIZER.encode_block(block, path, offset)
    return tokens.astype(dtype), lengths, count_block(block), len(block)


def _count_task(task):
    path, offset, block = task
    return count_words(block, path, offset), len(block)


def _alphabet_task(task):
    path, offset, block = task
    from .errors import check_utf8
    return frozenset(check_utf8(block, path, offset)), len(block)


def ordered_map(fn: Callable, tasks, workers: int, tokenizer=None, total: Optional[int] = None,
                desc: str = "", progress: bool = True):
    """``map(fn, tasks)`` in order over a process pool, holding at most 4 x workers tasks in flight.

    Every result's last element is the number of input bytes it covered (for the tqdm bar).
    """
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
    try:
        if workers == 1:
            _init_worker(tokenizer)
            for t in tasks:
                r = fn(t)
                bar.update(r[-1])
                yield r
            return
        # spawn, not fork: the parent may hold torch/OpenMP threads, which fork does not copy safely.
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            pending = collections.deque()
            it = iter(tasks)
            for t in it:
                pending.append(pool.apply_async(fn, (t,)))
                if len(pending) >= 4 * workers:
                    r = pending.popleft().get()
                    bar.update(r[-1])
                    yield r
            while pending:
                r = pending.popleft().get()
                bar.update(r[-1])
                yield r
    finally:
        bar.close()


def _alphabet(path: str, cfg: PreprocessConfig) -> set:
    tasks = ((path, o, b) for o, b in iter_blocks(path, cfg.block_bytes, "utf8"))
    alphabet = set()
    for chars, _ in ordered_map(_alphabet_task, tasks, cfg.workers, total=os.path.getsize(path),
                                desc="alphabet", progress=cfg.progress):
        alphabet |= chars
    return alphabet


def build_tokenizer(cfg: PreprocessConfig, train_path: Optional[str]) -> Tokenizer:
    """The tokenizer for ``cfg``; char alphabets and word vocabularies are counted on ``train_path``."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "sentencepiece":
        from .tokenizers.sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer(cfg.sp_model)
    if cfg.tokenizer == "hf":
        from .tokenizers.hf import HFTokenizer
        return HFTokenizer(cfg.hf_tokenizer)
    if train_path is None:
        raise DataError(f"--tokenizer {cfg.tokenizer} builds its vocabulary on the train split, but no train "
                        f"file was given: pass --input DIR with train.txt or --train FILE")
    if cfg.tokenizer == "char":
        return CharTokenizer("".join(sorted(_alphabet(train_path, cfg))))
    tasks = ((train_path, o, b) for o, b in iter_blocks(train_path, cfg.block_bytes, "line"))
    counts = collections.Counter()
    for c, _ in ordered_map(_count_task, tasks, cfg.workers, total=os.path.getsize(train_path),
                            desc="vocab", progress=cfg.progress):
        counts.update(c)
    return WordTokenizer.build(counts, cfg.min_count)


def tokenize_file(path: str, tokenizer: Tokenizer, prefix: str, dtype: str, workers: int = 1,
                  block_bytes: int = 1 << 20, progress: bool = True) -> int:
    """Write ``path`` tokenized as ``prefix.bin``/``prefix.idx``; return the number of tokens."""
    return tokenize_and_count(path, tokenizer, prefix, dtype, workers, block_bytes, progress)["tokens"]


def tokenize_and_count(path: str, tokenizer: Tokenizer, prefix: str, dtype: str, workers: int = 1,
                       block_bytes: int = 1 << 20, progress: bool = True) -> Dict[str, int]:
    """``tokenize_file``, returning the counts of the text as well: ``{"tokens", "bytes", "chars", "words",
    "lines"}`` (see ``text_counts``)."""
    from .token_stream import indexed_dataset

    IndexedDatasetBuilder = indexed_dataset().IndexedDatasetBuilder

    np_dtype = np.dtype(dtype).type
    if isinstance(tokenizer, ByteTokenizer):
        # bytes are their own ids: one process copies ~900 MB/s, and a pool only adds its start-up and the
        # transfer of every block twice (bench/preprocess.py, 50 MB: 0.1 s in-process vs 0.4 s on 2 workers)
        workers = 1
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np_dtype)
    n_tokens, counter = 0, TextCounter()
    tasks = ((path, o, b, np_dtype) for o, b in iter_blocks(path, block_bytes, tokenizer.block_cut))
    try:
        for tokens, lengths, counts, _ in ordered_map(_encode_task, tasks, workers, tokenizer, os.path.getsize(path),
                                                      desc=os.path.basename(path), progress=progress):
            counter.add(counts)
            if tokens.size:
                builder.add_document(tokens, lengths)
                n_tokens += tokens.size
    except BaseException:
        builder.data_file.close()
        for p in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(p):
                os.remove(p)
        raise
    builder.finalize(prefix + ".idx")
    return {"tokens": n_tokens, **counter.result()}


def preprocess_corpus(splits: Dict[str, str], output_prefix: str, cfg: PreprocessConfig) -> TokenizerMeta:
    """Tokenize every ``{split: text file}`` into ``output_prefix.<split>.bin/.idx`` with one tokenizer.

    All inputs are checked (exist, non-empty, text) before anything is written.
    """
    if not splits:
        raise DataError("no input files: pass --input DIR (with train.txt/valid.txt/test.txt) or --train FILE")
    for name, path in splits.items():
        require_text_file(path, utf8=cfg.tokenizer != "byte", what=f"{name} split",
                          fix="give the text file get_data.py wrote (or your own UTF-8 corpus)",
                          utf8_fix="convert it to UTF-8 or use --tokenizer byte")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(cfg, splits.get("train"))
    if isinstance(tok, CharTokenizer):  # find characters valid/test lack in train now, not after writing train
        for name, path in splits.items():
            if name != "train":
                extra = _alphabet(path, cfg) - set(tok.chars)
                if extra:
                    raise DataError(f"{path}: character(s) {''.join(sorted(extra))[:20]!r} of the {name} split are not "
                                    f"in the train alphabet of {tok.vocab_size} characters: use --tokenizer byte")
    dtype = choose_dtype(tok.vocab_size, cfg.dtype)
    meta = tok.to_metadata(dtype)
    if isinstance(tok, WordTokenizer):
        meta.vocab_file = os.path.abspath(output_prefix + ".vocab.txt")
        tok.save(meta.vocab_file)
    meta.save(output_prefix + ".tokenizer.json")
    meta.splits = {}
    for name, path in splits.items():
        meta.splits[name] = tokenize_and_count(path, tok, f"{output_prefix}.{name}", dtype, cfg.workers,
                                               cfg.block_bytes, cfg.progress)
    meta.save(output_prefix + ".tokenizer.json")  # again, with the counts of every split's text
    return meta
