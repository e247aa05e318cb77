"""`setting`: a field of a config dataclass with its help text, which the command line (vqmoe_ds/cli.py) shows for
the field's flag.  ``setting(default, "help")``; ``setting(help="...")`` for a field without a default;
``setting(factory=..., help="...")`` for a mutable default; ``by_model=True`` for a field that is no setting of its
own but filled in by the config that holds this one (an MoE layer's width, set by the model config)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


def setting(default: Any = dataclasses.MISSING, help: str = "", factory: Optional[Callable[[], Any]] = None,
            by_model: bool = False):
    """A ``dataclasses.field`` whose metadata holds ``help`` (and ``by_model`` when set)."""
    meta = {"help": help, **({"by_model": True} if by_model else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    """The help text of a config dataclass field ('' when it has none)."""
    return str(f.metadata.get("help", ""))


def set_by_model(f: dataclasses.Field) -> bool:
    """Whether a config dataclass field is filled in by the config that holds it (``setting(by_model=True)``)."""
    return bool(f.metadata.get("by_model", False))
