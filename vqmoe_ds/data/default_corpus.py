"""A synthetic corpus made of five "sources" with very different statistics, for the demo.

Why: the demo must run with no download, and a router that learns anything should send different
sources to different experts -- which is only visible if the sources really differ.  So each document
comes from one of:

* ``arithmetic``  -- correct equations over small integers: ``37 + 5 = 42``
* ``english``     -- sentences from a small grammar: ``the quiet cat watches a green river .``
* ``code``        -- Python-like functions: ``def scale_3(x, y):`` / ``    return x * 3 + y``
* ``dna``         -- lines of 60 bases from a Markov chain over ``ACGT`` (CpG-poor, AT-rich)
* ``dictionary``  -- ``key: value`` records: ``colour: amber``

Documents are a few lines long, end with a blank line, and are interleaved at random.  Everything is ASCII,
so byte offsets are character offsets and byte-level token positions: ``generate_documents`` returns the
source of every byte range, for measuring how "pure" the routing of each source is.
Deterministic: the same ``(num_bytes, seed)`` always gives the same text.
"""
from __future__ import annotations

import random
from typing import List, Tuple

from .errors import DataError

SOURCES = ("arithmetic", "english", "code", "dna", "dictionary")

_DET = ("the", "a", "every", "no", "some", "this")
_ADJ = ("quiet", "green", "old", "bright", "small", "heavy", "distant", "gentle", "red", "hollow")
_NOUN = ("cat", "river", "teacher", "engine", "garden", "storm", "letter", "king", "bridge", "lamp", "child", "forest")
_VERB = ("watches", "follows", "finds", "carries", "remembers", "builds", "crosses", "hides", "opens", "greets")
_ADV = ("slowly", "again", "at night", "without fear", "in winter", "every day")
_CONJ = ("and", "but", "while", "because")
_FN = ("scale", "shift", "mix", "clip", "blend", "count")
_VARS = ("x", "y", "z", "n", "acc", "total")
_KEYS = {
    "colour": ("amber", "blue", "crimson", "grey", "olive", "teal", "white"),
    "city": ("lima", "oslo", "pune", "quito", "riga", "turin", "zagreb"),
    "status": ("active", "archived", "pending", "retired"),
    "size": ("small", "medium", "large"),
    "owner": ("ada", "bruno", "chen", "dora", "emeka", "farah"),
}
# DNA: next-base probabilities given the previous base (A, C, G, T) -- AT-rich, few CG pairs.
_DNA_NEXT = {"A": (0.35, 0.15, 0.2, 0.3), "C": (0.3, 0.25, 0.05, 0.4), "G": (0.3, 0.2, 0.25, 0.25),
             "T": (0.25, 0.2, 0.2, 0.35)}


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}"


def _clause(rng: random.Random) -> str:
    words = [rng.choice(_DET)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJ))
    words += [rng.choice(_NOUN), rng.choice(_VERB), rng.choice(_DET)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN))
    if rng.random() < 0.3:
        words.append(rng.choice(_ADV))
    return " ".join(words)


def _english(rng: random.Random) -> str:
    s = _clause(rng)
    if rng.random() < 0.35:
        s += f" {rng.choice(_CONJ)} {_clause(rng)}"
    return s + " ."


def _code(rng: random.Random) -> str:
    name, k = rng.choice(_FN), rng.randint(1, 9)
    a, b = rng.sample(_VARS, 2)
    lines = [f"def {name}_{k}({a}, {b}):"]
    for _ in range(rng.randint(1, 3)):
        v = rng.choice(_VARS)
        lines.append(f"    {v} = {a} {rng.choice('+-*')} {rng.randint(1, 9)} {rng.choice('+-*')} {b}")
    lines.append(f"    return {rng.choice(_VARS)}")
    return "\n".join(lines)


def _dna(rng: random.Random) -> str:
    base, out = rng.choice("ACGT"), []
    for _ in range(60):
        out.append(base)
        base = rng.choices("ACGT", weights=_DNA_NEXT[base])[0]
    return "".join(out)


def _dictionary(rng: random.Random) -> str:
    key = rng.choice(sorted(_KEYS))
    if rng.random() < 0.2:
        return f"id: {rng.randint(1000, 9999)}"
    return f"{key}: {rng.choice(_KEYS[key])}"


_MAKERS = {"arithmetic": _arithmetic, "english": _english, "code": _code, "dna": _dna, "dictionary": _dictionary}


def generate_documents(num_bytes: int, seed: int = 0) -> Tuple[str, List[Tuple[int, int, str]]]:
    """The corpus text of exactly ``num_bytes`` ASCII bytes and its ``(start, end, source)`` byte spans."""
    if num_bytes < 1:
        raise DataError(f"num_bytes={num_bytes} must be >= 1")
    rng = random.Random(seed)
    parts: List[str] = []
    spans: List[Tuple[int, int, str]] = []
    total = 0
    while total < num_bytes:
        source = rng.choice(SOURCES)
        make = _MAKERS[source]
        doc = "\n".join(make(rng) for _ in range(rng.randint(3, 12))) + "\n\n"
        doc = doc[:num_bytes - total]
        parts.append(doc)
        spans.append((total, total + len(doc), source))
        total += len(doc)
    return "".join(parts), spans


def generate(num_bytes: int, seed: int = 0) -> str:
    """``num_bytes`` of the synthetic corpus (see module docstring); same arguments, same text."""
    return generate_documents(num_bytes, seed)[0]
