"""How much text a split holds, in the units the literature divides by: UTF-8 bytes, characters, words, lines.

Why: a model's loss is per *token*, but published numbers are per byte (enwik8), per character (text8) or per
word (WikiText-103, lm1b), whatever the tokenizer.  Preprocessing records these counts of every split in
``PREFIX.tokenizer.json`` (``TokenizerMeta.splits``), so the driver can convert its summed NLL into each of
them; raw-byte data (``--data-file``, the default corpus) is counted from its bytes when it is loaded.

Definitions (``count_bytes`` of the whole text gives the same numbers as summing ``TextCounter`` over blocks
cut anywhere):

* ``bytes``: the length of the text in UTF-8;
* ``chars``: Unicode characters = the bytes that are not UTF-8 continuation bytes (``0b10xxxxxx``);
* ``words``: ``len(text.split())`` -- maximal runs of non-whitespace characters (Python's ``str.isspace``;
  bytes that are not valid UTF-8 count as non-whitespace);
* ``lines``: ``\\n`` characters, plus one if the text does not end with one (the lines the word and
  sentencepiece tokenizers give an end-of-line token each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

COUNT_KEYS = ("bytes", "chars", "words", "lines")


@dataclass
class BlockCounts:
    """The counts of one block, with what merging it with its neighbours needs."""
    bytes: int
    chars: int
    words: int
    newlines: int
    starts_in_word: bool  # the block's first character is not whitespace
    ends_in_word: bool  # the block's last character is not whitespace
    last_byte: int  # -1 for an empty block


def count_block(block: bytes) -> BlockCounts:
    if not block:
        return BlockCounts(0, 0, 0, 0, False, False, -1)
    arr = np.frombuffer(block, dtype=np.uint8)
    chars = int(np.count_nonzero((arr & 0xC0) != 0x80))
    text = block.decode("utf-8", errors="replace")
    return BlockCounts(len(block), chars, len(text.split()), block.count(b"\n"), not text[0].isspace(),
                       not text[-1].isspace(), block[-1])


class TextCounter:
    """Counts of a text fed in order as blocks cut anywhere (a word cut by a block boundary counts once)."""

    def __init__(self):
        self.bytes = self.chars = self.words = self.newlines = 0
        self._in_word, self._last_byte = False, -1

    def add(self, c: BlockCounts) -> None:
        if not c.bytes:
            return
        self.bytes += c.bytes
        self.chars += c.chars
        self.newlines += c.newlines
        self.words += c.words - (1 if self._in_word and c.starts_in_word and c.words else 0)
        self._in_word, self._last_byte = c.ends_in_word, c.last_byte

    def result(self) -> Dict[str, int]:
        lines = self.newlines + (1 if self.bytes and self._last_byte != ord("\n") else 0)
        return {"bytes": self.bytes, "chars": self.chars, "words": self.words, "lines": lines}


def count_bytes(data: bytes, block: int = 1 << 24) -> Dict[str, int]:
    """``{"bytes", "chars", "words", "lines"}`` of ``data`` (read in blocks, so large texts need no copy)."""
    counter = TextCounter()
    view = memoryview(data)
    for start in range(0, len(data), block):
        counter.add(count_block(bytes(view[start:start + block])))
    return counter.result()
