"""`setting`: a field of a config dataclass with its help text, which the command line (vqmoe_ds/cli.py) shows for
the field's flag.  ``setting(default, "help")``; ``setting(help="...")`` for a field without a default;
``setting(factory=..., help="...")`` for a mutable default."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


def setting(default: Any = dataclasses.MISSING, help: str = "", factory: Optional[Callable[[], Any]] = None):
    """A ``dataclasses.field`` whose metadata holds ``help``."""
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    """The help text of a config dataclass field ('' when it has none)."""
    return str(f.metadata.get("help", ""))
