"""Driver settings as config-file entries.

A setting is named by any flag of the driver (``train-iters``, ``--topk``), or by its config-file key
(``optim.train_iters``); `DriverSettings` turns it into its (section, field) and checks its value with the
field's own rules (``vqmoe_ds.cli.FieldSpec``), so that a run's settings are written as one YAML file that
``pretrain_vqmoe.py --config-file`` reads back.  Driver flags given as a command line (after ``--`` on the sweep's
command line) are read by the driver's own parser.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .presets import SweepError

# settings the sweep sets itself (section.field), and how
OWNED = {"run.out_dir": "as OUT/<run>", "optim.seed": "from --seeds", "moe.router": "from --routers",
         "run.load": "to resume a run from its checkpoint", "run.save": "to OUT/<run>/checkpoints, where a resume looks",
         "run.progress": "off (runs log to OUT/<run>.log)", "parallel.local_rank": "through the launcher",
         "parallel.distributed_port": "to a free port per run"}
PRESET_KEY = "config"  # the named shape (--config NAME), a top-level key of the config file


def parse_bool(text: str) -> Optional[bool]:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    return None


class DriverSettings:
    """The settings of ``pretrain_vqmoe.py`` by name (flag or config key), through its command line's fields."""

    def __init__(self, command_line=None):
        if command_line is None:
            from ..training.lm import command_line as make

            command_line = make()
        self.cmd = command_line
        self.by_flag = command_line.all_flags()  # every value spelling -> FieldSpec
        self.by_key = {s.key: s for specs in command_line.specs.values() for s in specs}

    # ---- names ----------------------------------------------------------------------------------------------
    def spec(self, name: str, where: str):
        """The FieldSpec of a flag name (with or without dashes) or a config key ``section.field``."""
        if name in self.by_key:
            return self.by_key[name]
        flag = "--" + name.lstrip("-")
        if flag in self.by_flag:
            return self.by_flag[flag]
        close = difflib.get_close_matches(flag, list(self.by_flag), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"{where}: pretrain_vqmoe.py has no flag {flag}{hint}: see python pretrain_vqmoe.py --help")

    def key(self, name: str, where: str) -> str:
        """The config key ``section.field`` of a setting name (``config`` stays itself)."""
        if name == PRESET_KEY:
            return PRESET_KEY
        spec = self.spec(name, where)
        if spec.key in OWNED:
            raise SweepError(f"{where}: the sweep sets {spec.flag} itself ({OWNED[spec.key]}): remove it")
        if spec.cli_only:
            raise SweepError(f"{where}: {spec.flag} is set by the launcher, not by a run's settings: remove it")
        return spec.key

    def flag_of(self, key: str) -> str:
        """The flag (without dashes) a config key is written as in reports."""
        return PRESET_KEY if key == PRESET_KEY else self.by_key[key].flag[2:]

    # ---- values ----------------------------------------------------------------------------------------------
    def value(self, key: str, value: Any, where: str) -> Any:
        """``value`` (a Python value, or text from the command line) as the field's value, checked."""
        if key == PRESET_KEY:
            if self.cmd.presets and value not in self.cmd.presets:
                raise SweepError(f"{where}: config {value!r} is not a named shape: choose one of "
                                 f"{', '.join(self.cmd.presets)}")
            return value
        spec = self.by_key[key]
        if isinstance(value, str):
            if spec.type is bool:
                b = parse_bool(value)
                if b is None:
                    raise SweepError(f"{where}: {spec.flag} is a boolean: write {spec.flag[2:]}=true or "
                                     f"{spec.flag[2:]}=false")
                value = b
            else:
                try:
                    value = spec.convert(value)
                except ValueError as e:
                    raise SweepError(f"{where}: {e}") from None
        try:
            return spec.check(value, where)
        except ValueError as e:
            raise SweepError(str(e)) from None

    def setting(self, text: str, where: str = "--set") -> Tuple[str, Any]:
        """``FLAG=VALUE`` (or ``section.field=VALUE``) as (config key, checked value)."""
        if "=" not in text:
            raise SweepError(f"{where} {text!r} is not FLAG=VALUE: write it like train-iters=1000")
        name, value = text.split("=", 1)
        key = self.key(name, f"{where} {text}")
        return key, self.value(key, value, f"{where} {text}")

    def from_mapping(self, flags: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """A preset's settings (flag names -> Python values or `Scaled`) by config key; `Scaled` values stay."""
        from .presets import Scaled

        out: Dict[str, Any] = {}
        for name, value in flags.items():
            key = self.key(name, where)
            if isinstance(value, Scaled):
                out[key] = Scaled(self.key(value.flag, where), value.factor, value.minimum)
            else:
                out[key] = self.value(key, value, f"{where}: --{name.lstrip('-')}")
        return out

    def from_argv(self, argv: Sequence[str]) -> Dict[str, Any]:
        """Driver flags as a command line (after ``--``), read by the driver's parser, by config key."""
        from ..cli import ConfigError

        if not argv:
            return {}
        try:
            parsed = self.cmd.parse(list(argv))
        except ConfigError as e:
            raise SweepError(f"after --: {e}") from None
        out: Dict[str, Any] = {}
        for key, origin in parsed.origins.items():
            if key in OWNED:
                raise SweepError(f"after --: the sweep sets {origin if origin.startswith('--') else key} itself "
                                 f"({OWNED[key]}): remove it")
            sec, name = key.split(".", 1)
            out[key] = parsed.values[sec][name]
        if getattr(parsed.namespace, "config", None):
            out[PRESET_KEY] = parsed.namespace.config
        return out


def as_config_file(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"section.field": value}`` as the driver's config-file layout ``{section: {field: value}}``."""
    out: Dict[str, Any] = {}
    for key, value in settings.items():
        if key == PRESET_KEY:
            out[PRESET_KEY] = value
            continue
        sec, name = key.split(".", 1)
        out.setdefault(sec, {})[name] = value
    return out


__all__ = ["DriverSettings", "OWNED", "PRESET_KEY", "as_config_file", "parse_bool"]
