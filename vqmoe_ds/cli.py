"""Command lines generated from config dataclasses: the one configuration surface of every driver.

A driver lists its *sections* -- (name, dataclass) pairs such as ``("moe", MoEConfig)`` -- and gets:

  * a flag for every field: ``--field-name`` unless the class's ``FLAGS`` spells it otherwise (Megatron's names,
    e.g. ``n_layer`` -> ``--num-layers``); further spellings there are aliases (``--topk`` for ``--top-k``), and
    an alias written ``--flag=value`` sets that value (``--disable-moe-token-dropping=false``);
  * the flag's type from the field's annotation (``Optional[...]`` fields also take ``none``; booleans are
    ``--x`` / ``--no-x``), its choices from a ``Literal[...]`` annotation, and its help line from the field's metadata
    (``vqmoe_ds.fields.setting(default, "help")``) plus the default;
  * ``--config-file FILE`` (YAML or JSON): the same sections as keys, e.g. ``{"moe": {"top_k": 1}}``; flags
    override the file, the file overrides the defaults.  The resolved configuration a run writes
    (``OUT_DIR/config.json``) is such a file, so ``--config-file runs/a/config.json`` repeats run a.

Checks of values live in the dataclasses' ``__post_init__`` and nowhere else; this module only checks what a
command line or a file can get wrong by itself (unknown keys, wrong types, an alias contradicting its flag)
and turns every error into one line (`ConfigError`) before any process group starts.  Fields in a class's
``CLI_ONLY`` (set by launchers: ``--local_rank``) are flags but never read from or written to files.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError
from .fields import help_of


# ---- what a dataclass says about its fields ------------------------------------------------------------------
def _unwrap(tp) -> Tuple[type, bool]:
    """(base type, optional) of an annotation like ``Optional[int]``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


@dataclass
class FieldSpec:
    section: str
    name: str
    type: type
    optional: bool
    default: Any
    flags: List[str]  # canonical first
    consts: Dict[str, Any]  # alias flag -> the value it sets
    choices: Optional[Sequence[Any]]
    help: str
    cli_only: bool

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def flag(self) -> str:
        return self.flags[0]

    def convert(self, text: str):
        """A command-line string as this field's value."""
        if self.optional and text.lower() == "none":
            return None
        try:
            value = self.type(text)
        except ValueError:
            example = self.default if self.default is not None else {int: 8, float: 0.5}.get(self.type, "x")
            raise ConfigError(f"{self.flag} {text!r} is not {'an' if self.type is int else 'a'} "
                           f"{_type_name(self.type)}: give a number like {example}") from None
        return value

    def check(self, value, where: str):
        """A config-file value, type-checked (ints are accepted where floats are expected)."""
        if value is None and self.optional:
            return None
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}.get(self.type, lambda v: True)
        if not ok(value):
            want = _type_name(self.type) + (" or null" if self.optional else "")
            raise ConfigError(f"{where}: {self.key} = {value!r} has type {type(value).__name__}, not {want}: write it as "
                           f"{want} (e.g. {self.key.split('.')[-1]}: {json.dumps(self.default)})")
        if self.type is float:
            value = float(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where}: {self.key} = {value!r} is not one of {', '.join(map(str, self.choices))}: "
                           f"choose one of them")
        return value


@dataclass
class Section:
    """One config dataclass on the command line.  ``fields``: expose only these; ``exclude``: all but these;
    ``flags``: this driver's spellings (replacing the class's); ``defaults``: this driver's defaults."""
    name: str
    cls: type
    title: str = ""
    fields: Optional[Sequence[str]] = None
    exclude: Sequence[str] = ()
    flags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_note: Optional[str] = None  # shown instead of each field's default (e.g. "the --config shape's")
    choices: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # this driver's choices (replacing the class's)

    def specs(self) -> List[FieldSpec]:
        hints = typing.get_type_hints(self.cls)
        class_flags = getattr(self.cls, "FLAGS", {})
        choices = dict(self.choices)  # this driver's; else the field's Literal[...] values
        cli_only = set(getattr(self.cls, "CLI_ONLY", ()))
        out = []
        for f in dataclasses.fields(self.cls):
            if self.fields is not None and f.name not in self.fields or f.name in self.exclude:
                continue
            tp, optional = _unwrap(hints[f.name])
            if typing.get_origin(tp) is typing.Literal:
                choices.setdefault(f.name, typing.get_args(tp))
                tp = type(typing.get_args(tp)[0])
            if tp not in (int, float, str, bool):
                continue  # nested structures (ModelConfig.moe) are sections of their own
            spellings = list(self.flags.get(f.name) or class_flags.get(f.name) or
                             ("--" + f.name.replace("_", "-"),))
            flags, consts = [], {}
            for s in spellings:
                if "=" in s:
                    flag, text = s.split("=", 1)
                    consts[flag] = {"true": True, "false": False}.get(text.lower(), text)
                else:
                    flags.append(s)
            if f.name in self.defaults:
                default = self.defaults[f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            out.append(FieldSpec(self.name, f.name, tp, optional, default, flags, consts, choices.get(f.name),
                                 help_of(f), f.name in cli_only))
        return out


class _Store(argparse.Action):
    """Records (flag, value) per field, so that an alias and its flag given with different values are caught."""

    def __init__(self, option_strings, dest, spec: FieldSpec, const_value=None, **kw):
        self.spec, self.const_value = spec, const_value
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        spec = self.spec
        if self.nargs == 0:
            if option_string in spec.consts:
                value = spec.consts[option_string]
            else:
                value = not option_string.startswith("--no-")
        else:
            value = spec.convert(values)
            if spec.choices is not None and value not in spec.choices:
                raise ConfigError(f"{option_string} {values!r}: invalid choice, choose one of "
                               f"{', '.join(map(str, spec.choices))}")
        given = namespace.__dict__.setdefault("_given", {})
        prev = given.get(spec.key)
        if prev is not None and prev[0] != option_string and prev[1] != value:
            raise ConfigError(f"{prev[0]} {_show(prev[1])} and {option_string} {_show(value)} both set {spec.key} to "
                           f"different values: give only one of them")
        given[spec.key] = (option_string, value)


def _show(v) -> str:
    return {True: "(true)", False: "(false)"}.get(v, str(v)) if isinstance(v, bool) else str(v)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error over several lines; one line instead
        raise ConfigError(f"{message} (see {self.prog} --help)")


@dataclass
class Shorthand:
    """A flag that sets several fields at once unless they are given themselves (``--dropout``)."""
    flag: str
    type: type
    targets: Sequence[str]  # "section.field"
    help: str


@dataclass
class Parsed:
    """What the command line and the config file set: only the given fields (defaults are the sections')."""
    values: Dict[str, Dict[str, Any]]
    origins: Dict[str, str]  # "section.field" -> "--flag" or "config file F"
    preset: Optional[str]
    config_file: Optional[str]
    specs: Dict[str, List[FieldSpec]]

    def given(self, section: str) -> Dict[str, Any]:
        return dict(self.values.get(section, {}))

    def build(self, section: str, cls, **fixed):
        """``cls(**defaults, **given, **fixed)``; its own checks' ``ValueError`` becomes one line naming where the
        bad value came from."""
        kw = {s.name: s.default for s in self.specs.get(section, [])}
        kw.update(self.given(section))
        kw.update(fixed)
        return self.checked(section, lambda: cls(**kw))

    def checked(self, section: str, make: Callable[[], Any]):
        try:
            return make()
        except ValueError as e:
            raise ConfigError(self.explain(section, str(e))) from None

    def explain(self, section: str, message: str) -> str:
        """Prefix a dataclass's error with where the offending value came from: the flag as typed, or the config
        file and key (when the message names a field that was given)."""
        named = []  # (where in the message, key) of every given field the message names
        for key in self.origins:
            m = re.search(rf"(?<![\w.]){re.escape(key.split('.', 1)[1])}=", message)
            if m:
                named.append((m.start(), key))
        if not named:
            return message
        key = min(named)[1]  # the field the message is about comes first
        origin, value = self.origins[key], self.values[key.split(".", 1)[0]][key.split(".", 1)[1]]
        if origin.startswith("config file"):
            return f"{origin}: {key}: {message}"
        return f"{origin}: {message}" if isinstance(value, bool) else f"{origin} {value}: {message}"


class CommandLine:
    """The flags of one driver.  ``presets``: named shapes chosen with ``--config NAME`` (key ``config`` in a
    config file)."""

    def __init__(self, prog: str, description: str, sections: Sequence[Section],
                 presets: Optional[Mapping[str, Any]] = None, default_preset: Optional[str] = None,
                 shorthands: Sequence[Shorthand] = (), extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
        self.prog, self.description = prog, description
        self.sections = list(sections)
        self.presets, self.default_preset = presets, default_preset
        self.shorthands = list(shorthands)
        self.extra = extra
        self.specs = {s.name: s.specs() for s in self.sections}
        seen: Dict[str, str] = {}
        for specs in self.specs.values():
            for spec in specs:
                for flag in [*spec.flags, *spec.consts]:
                    if flag in seen:
                        raise TypeError(f"{flag} is the flag of both {seen[flag]} and {spec.key}")
                    seen[flag] = spec.key

    def parser(self) -> argparse.ArgumentParser:
        p = _Parser(prog=self.prog, description=self.description, allow_abbrev=False)
        p.add_argument("--config-file", help="a YAML or JSON file with the settings of the sections below (keys: "
                       f"{', '.join(s.name for s in self.sections)}"
                       f"{', config' if self.presets else ''}); flags override it")
        if self.presets:
            p.add_argument("--config", choices=list(self.presets), default=None,
                           help=f"named shape the other settings start from (default {self.default_preset})")
        for sh in self.shorthands:
            p.add_argument(sh.flag, type=sh.type, default=None, help=sh.help)
        for section in self.sections:
            g = p.add_argument_group(section.title or section.name)
            for spec in self.specs[section.name]:
                default = ("" if spec.default is None else f" (default: {spec.default})") if not section.default_note \
                    else f" (default: {section.default_note})"
                help_text = (spec.help + default).replace("%", "%%")
                if spec.type is bool:
                    g.add_argument(*spec.flags, *[f"--no-{f[2:]}" for f in spec.flags], action=_Store, spec=spec,
                                   nargs=0, default=argparse.SUPPRESS, help=help_text)
                else:
                    metavar = ("{" + ",".join(map(str, spec.choices)) + "}" if spec.choices
                               else spec.flag[2:].upper().replace("-", "_"))
                    g.add_argument(*spec.flags, action=_Store, spec=spec, default=argparse.SUPPRESS,
                                   metavar=metavar, help=help_text)
                for flag, value in spec.consts.items():
                    g.add_argument(flag, action=_Store, spec=spec, nargs=0, default=argparse.SUPPRESS,
                                   help=f"the same as {spec.flag} {_show(value)}")
        if self.extra is not None:
            self.extra(p)
        return p

    def parse(self, argv: Optional[Sequence[str]] = None) -> Parsed:
        ns = self.parser().parse_args(argv)
        values: Dict[str, Dict[str, Any]] = {s.name: {} for s in self.sections}
        origins: Dict[str, str] = {}
        preset = None
        if ns.config_file:
            data = load_file(ns.config_file)
            preset = self._read_file(data, ns.config_file, values, origins)
        for key, (flag, value) in getattr(ns, "_given", {}).items():
            sec, name = key.split(".", 1)
            values[sec][name] = value
            origins[key] = flag
        for sh in self.shorthands:
            v = getattr(ns, sh.flag.lstrip("-").replace("-", "_"))
            if v is None:
                continue
            for target in sh.targets:
                sec, name = target.split(".", 1)
                if not origins.get(target, "").startswith("--"):  # its own flag wins over the shorthand
                    values[sec][name] = v
                    origins[target] = sh.flag
        if self.presets:
            preset = getattr(ns, "config", None) or preset or self.default_preset
        parsed = Parsed(values, origins, preset, ns.config_file, self.specs)
        parsed.namespace = ns  # type: ignore[attr-defined]  (the extra arguments a driver added)
        return parsed

    def _read_file(self, data, path, values, origins) -> Optional[str]:
        where = f"config file {path}"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} holds a {type(data).__name__}, not a mapping of sections: write it as "
                           f"{{section: {{setting: value}}}} with sections {', '.join(values)}")
        preset = None
        for sec, body in data.items():
            if sec in RECORD_KEYS:  # what a run wrote about its origin and resumes: not settings
                continue
            if sec == "config" and self.presets:
                if body is None:  # a resolved file that spells every setting out (e.g. an imported model's)
                    continue
                if body not in self.presets:
                    raise ConfigError(f"{where}: config = {body!r} is not a named shape: choose one of "
                                   f"{', '.join(self.presets)}")
                preset = body
                continue
            if sec not in values:
                raise ConfigError(f"{where}: unknown section {sec!r}{_near(sec, values)}: use "
                               f"{', '.join(values)}{', config' if self.presets else ''}")
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: section {sec} is a {type(body).__name__}, not a mapping: write it as "
                               f"{sec}: {{setting: value}}")
            specs = {s.name: s for s in self.specs[sec] if not s.cli_only}
            retired = getattr(next((s.cls for s in self.sections if s.name == sec), None), "RETIRED", ())
            for name, value in body.items():
                if name in retired and name not in specs:  # a setting earlier versions wrote, without effect now
                    continue
                if name not in specs:
                    raise ConfigError(f"{where}: unknown key {sec}.{name}{_near(name, specs)}: remove it or fix its "
                                   f"spelling (see --help for the settings of {sec})")
                values[sec][name] = specs[name].check(value, where)
                origins[f"{sec}.{name}"] = where
        return preset

    def resolved(self, preset: Optional[str], objects: Mapping[str, Any]) -> Dict[str, Any]:
        """The resolved configuration to write: every exposed field of every section's object (dicts pass
        through), in a form ``--config-file`` reads back."""
        out: Dict[str, Any] = {"config": preset} if self.presets else {}
        for section in self.sections:
            obj = objects[section.name]
            if isinstance(obj, dict):
                out[section.name] = dict(obj)
                continue
            out[section.name] = {s.name: getattr(obj, s.name) for s in self.specs[section.name] if not s.cli_only}
        return out

    def all_flags(self) -> Dict[str, FieldSpec]:
        return {flag: spec for specs in self.specs.values() for spec in specs for flag in spec.flags}


def _near(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# keys of a resolved configuration that record where the run came from and how it was resumed, not settings:
# a config file may hold them (a run's config.json does) and they are skipped when it is read
RECORD_KEYS = ("imported", "converted", "resumes")


def _yaml_loader():
    """PyYAML's safe loader, reading numbers in exponent form without a dot (``2e-3``, ``1E5``) as floats, as YAML
    1.2 and JSON do (YAML 1.1 makes them strings)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_file(path: str) -> Any:
    """A YAML (.yaml/.yml) or JSON file; one-line errors."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config-file {path} does not exist: give a YAML or JSON file (e.g. a run's config.json)")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"--config-file {path} is not valid YAML{line}: fix the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config-file {path} is not valid JSON (line {e.lineno}: {e.msg}): fix the file, or name "
                       f"it .yaml for YAML") from None


__all__ = ["ConfigError", "Section", "Shorthand", "CommandLine", "Parsed", "FieldSpec", "load_file"]
