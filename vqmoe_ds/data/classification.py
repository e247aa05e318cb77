"""Readers for the fine-tuning sets of the paper: SST-2, SST-5, IMDB, BANKING77, and any TSV/CSV.

Each reader returns a ``ClassificationData``: ``examples`` as ``(text, label_id)`` pairs in file order and
``label_names`` (``label_names[label_id]``).  Labels are numbered the way each benchmark does it (SST-2:
0 negative / 1 positive; SST-5: 0 very negative ... 4 very positive; IMDB: neg 0 / pos 1); for category
names (BANKING77, generic tables) the ids are the sorted names, and the train split's ``label_names``
should be passed when reading valid/test so that ids agree even if a split lacks a class.
Every malformed row is a one-line ``DataError`` naming ``file:line``.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .errors import DataError, require_file, require_text_file

SST2_LABELS = ["negative", "positive"]
SST5_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
IMDB_LABELS = ["neg", "pos"]


@dataclass
class ClassificationData:
    examples: List[Tuple[str, int]] = field(default_factory=list)
    label_names: List[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _read_text(path: str) -> str:
    require_text_file(path, what="classification file", fix="give the benchmark's text/TSV/CSV file")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _int_label(raw: str, n: int, path: str, line: int) -> int:
    try:
        y = int(raw.strip())
    except ValueError:
        y = -1
    if not 0 <= y < n:
        raise DataError(f"{path}:{line}: label {raw.strip()!r} is not an integer in [0, {n}): check the column order "
                        f"and that this is a labelled split (GLUE test files have no labels)")
    return y


def read_table(path: str, text_column: str, label_column: str, delimiter: str = "\t",
               label_names: Optional[Sequence[str]] = None, integer_labels: bool = False,
               num_labels: Optional[int] = None) -> ClassificationData:
    """A delimited file with a header row; ``text_column``/``label_column`` name the columns to use.

    ``integer_labels``: the label column holds ids in ``[0, num_labels)``; otherwise it holds names, mapped
    through ``label_names`` (default: the sorted names found in this file).
    """
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise DataError(f"{path} has no rows: give a file with a header and data")
    header = rows[0][1]
    for col in (text_column, label_column):
        if col not in header:
            raise DataError(f"{path}: column {col!r} is not in the header {header}: choose the text and label "
                            f"columns by name")
    ti, li = header.index(text_column), header.index(label_column)
    raw = []
    for n, row in rows[1:]:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: {len(row)} fields where the header has {len(header)}: check the delimiter "
                            f"({delimiter!r}) and quoting")
        raw.append((row[ti], row[li], n))
    if not raw:
        raise DataError(f"{path} has a header but no examples: give a file with data rows")
    if integer_labels:
        k = num_labels if num_labels is not None else len(label_names or ())
        names = list(label_names) if label_names is not None else [str(i) for i in range(k)]
        return ClassificationData([(t, _int_label(y, k, path, n)) for t, y, n in raw], names)
    names = list(label_names) if label_names is not None else sorted({y for _, y, _ in raw})
    index = {name: i for i, name in enumerate(names)}
    out = []
    for t, y, n in raw:
        if y not in index:
            raise DataError(f"{path}:{n}: label {y!r} is not one of the {len(names)} known labels: pass the train "
                            f"split's label_names or check the label column")
        out.append((t, index[y]))
    return ClassificationData(out, names)


def read_sst2(path: str) -> ClassificationData:
    """GLUE SST-2 ``train.tsv``/``dev.tsv``: header ``sentence<TAB>label``, labels 0/1."""
    return read_table(path, "sentence", "label", "\t", SST2_LABELS, integer_labels=True)


_LEAF = re.compile(r"\(\d+ ([^()\s]+)\)")
_ROOT = re.compile(r"^\((\d+)\s")


def read_sst5(path: str) -> ClassificationData:
    """SST-5 in the PTB tree format (``(3 (2 It) (4 ...))``, one tree per line; the root's label counts)
    or as TSV: ``label<TAB>sentence`` without header, or with a header naming ``label`` and ``sentence``."""
    text = _read_text(path)
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if lines and lines[0][1].lstrip().startswith("("):
        out = []
        for n, ln in lines:
            ln = ln.strip()
            m = _ROOT.match(ln)
            if not m or ln.count("(") != ln.count(")"):
                raise DataError(f"{path}:{n}: not a labelled PTB tree like '(3 (2 It) (4 works))': check the file format")
            out.append((" ".join(_LEAF.findall(ln)), _int_label(m.group(1), 5, path, n)))
        return ClassificationData(out, SST5_LABELS)
    first = lines[0][1].split("\t") if lines else []
    if "label" in first and ("sentence" in first or "text" in first):
        return read_table(path, "sentence" if "sentence" in first else "text", "label", "\t", SST5_LABELS,
                          integer_labels=True)
    out = []
    for n, ln in lines:
        parts = ln.split("\t", 1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'label<TAB>sentence': check the delimiter")
        out.append((parts[1], _int_label(parts[0], 5, path, n)))
    return ClassificationData(out, SST5_LABELS)


def read_imdb(root: str, split: str = "train") -> ClassificationData:
    """The aclImdb folder: ``root/<split>/neg/*.txt`` (label 0) and ``root/<split>/pos/*.txt`` (label 1).

    Files are read in sorted name order, negatives first; the text is kept as is (``<br />`` included).
    """
    out = []
    for y, name in enumerate(IMDB_LABELS):
        folder = os.path.join(root, split, name)
        if not os.path.isdir(folder):
            raise DataError(f"IMDB folder {folder} does not exist: point --data at the unpacked aclImdb folder "
                            f"(with train/ and test/, each holding pos/ and neg/)")
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".txt"):
                p = os.path.join(folder, fn)
                out.append((_read_text(p).strip(), y))
    if not out:
        raise DataError(f"IMDB folder {os.path.join(root, split)} holds no .txt reviews: check the path")
    return ClassificationData(out, list(IMDB_LABELS))


def read_banking77(path: str, label_names: Optional[Sequence[str]] = None) -> ClassificationData:
    """BANKING77 ``train.csv``/``test.csv``: header ``text,category``; ids = sorted category names."""
    require_file(path, "BANKING77 file", "give the dataset's train.csv or test.csv")
    return read_table(path, "text", "category", ",", label_names)
