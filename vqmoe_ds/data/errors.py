"""The one exception type of the data package, and the input checks every entry point shares.

Why: a bad corpus should stop a run *before* any training starts, with one line that names the file, what
is wrong with it and how to fix it -- not a traceback from deep inside numpy, zipfile or megatron-core.
The command-line tools print ``error: <message>`` and exit with status 2 when they catch a ``DataError``.
"""
from __future__ import annotations

import codecs
import os

# How much of a file the text checks look at: enough to catch a binary file or the wrong encoding at once,
# cheap even for enwik8; the rest is checked block by block while it is read.
SNIFF_BYTES = 1 << 16


class DataError(ValueError):
    """Bad data input.  The message is one line naming the file, the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


def require_file(path: str, what: str = "input file", fix: str = "check the path") -> str:
    """Return ``path`` if it is an existing, non-empty regular file; else raise a one-line ``DataError``."""
    if not os.path.exists(path):
        raise DataError(f"{what} {path} does not exist: {fix}")
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} is not a regular file: {fix}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{what} {path} is empty: {fix}")
    return path


def require_output(path: str, flag: str, kind: str = "folder") -> str:
    """Check, before a tool does any work, that it can write its output ``path`` (a ``kind`` "folder" or "file"):
    nothing of the other kind is in the way and the folder can be created and written.  One-line DataError."""
    folder = path if kind == "folder" else (os.path.dirname(os.path.abspath(path)) or ".")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{flag} {path} is a file, where a folder is written: give a folder path")
    if kind == "file" and os.path.isdir(path):
        raise DataError(f"{flag} {path} is a folder, where a file is written: give a file path")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write to {folder} ({e.strerror}): give a path you can write to") from None
    return path


# the fix for text that is not UTF-8, wherever the text is being preprocessed (only a byte tokenizer takes any bytes)
UTF8_OR_BYTES = "convert it to UTF-8, or preprocess it with tools/preprocess_data.py --tokenizer byte"


def require_text_file(path: str, utf8: bool = True, what: str = "text file",
                      fix: str = "give a plain-text corpus (one document or sentence per line)",
                      utf8_fix: str = "convert it to UTF-8") -> str:
    """Check that ``path`` exists, is non-empty and looks like text.

    A NUL byte in the first 64 KiB means binary data (no text corpus has one).  With ``utf8`` the head must
    also decode as UTF-8 (a multi-byte character cut by the sniff window is allowed).  Byte-level corpora
    (enwik8) are checked with ``utf8=False`` since any byte is a valid token there.
    """
    require_file(path, what, fix)
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        raise DataError(f"{what} {path} is not text (it contains NUL bytes at offset {head.index(0)}): {fix}")
    if utf8:
        check_utf8(head, path, 0, final=False, fix=utf8_fix)
    return path


def check_utf8(data: bytes, path: str, offset: int, final: bool = True, fix: str = "convert it to UTF-8") -> str:
    """Decode ``data`` (read from ``path`` at byte ``offset``) as UTF-8, or raise a ``DataError`` saying where;
    ``fix``: what the caller's user can do (only a tool with a byte tokenizer can take any bytes)."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}): {fix}") from None
