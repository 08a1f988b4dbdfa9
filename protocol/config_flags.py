"""Command-line flags generated from a role's frozen config dataclass, and back.

A field becomes one flag, so a new knob is one edit (the field) and reaches every command that
takes its role's config. Per field, `field(metadata=...)` may say:
    flag: the flag's name (default: --field-name)     aliases: more names (vLLM's -tp)
    help: help text (default: the field's comments)  choices: allowed values
    unit: the flag is in units of this many of the field (--max-body-mb for max_body_bytes)
    invert: a bool flag meaning `not field` (--enforce-eager for cuda_graphs)
    no_aliases: more names that turn a bool flag off   nargs: for list fields (default "*")
    metavar: the value's name in --help
    shared: another config may declare the same flag in one parser; both then read it
Help comes from metadata or, by convention, from the comment at the end of the field's line and
the comment lines right above it (section headers `# -- x --` skipped).
Types from the annotation: int, float, str; bool as --x/--no-x; `X | None`; Literal (choices);
tuple/list of a scalar (space-separated values); dict as JSON ('{"image": 2}').
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import re
import tokenize
import types
import typing
from typing import Any, NamedTuple

_SCALARS = (int, float, str)


class Spec(NamedTuple):
    name: str  # the field
    flag: str  # primary option string
    dest: str  # attribute on the parsed namespace
    kind: str  # "bool", "json", "list" or "scalar"
    type: type  # of the flag's value (each item's, for lists)
    default: Any  # the field's default (dataclasses.MISSING: required)
    meta: dict

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def to_flag(self, value: Any) -> Any:
        """Field value -> the value the parsed flag would hold."""
        if value is None:
            return None
        if self.meta.get("invert"):
            return not value
        if "unit" in self.meta:
            return value / self.meta["unit"]
        return list(value) if self.kind == "list" else value

    def to_field(self, value: Any) -> Any:
        if value is None:
            return None
        if self.meta.get("invert"):
            return not value
        if "unit" in self.meta:
            return round(value * self.meta["unit"])
        return tuple(value) if self.kind == "list" else value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _kind(name: str, tp: Any) -> tuple[str, type, tuple | None]:
    """(kind, value type, Literal choices) of an annotation; TypeError for what has no flag."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]  # X | None, or the first spelling of a union (tuple[str, ...] | str)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", bool, None
    if tp in _SCALARS:
        return "scalar", tp, None
    if origin is typing.Literal:
        return "scalar", type(args[0]), tuple(args)
    if tp is dict or origin is dict:
        return "json", dict, None
    if origin in (tuple, list) and args and args[0] in _SCALARS:
        return "list", args[0], None
    raise TypeError(f"{name}: no flag for a field of type {tp!r}")


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        kind, tp, choices = _kind(f.name, hints[f.name])
        if choices and "choices" not in meta:
            meta["choices"] = choices
        if "unit" in meta:
            tp = float
        meta.setdefault("help", comments.get(f.name, ""))
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        dest = flag.lstrip("-").replace("-", "_")
        out.append(Spec(f.name, flag, dest, kind, tp, _field_default(f), meta))
    return tuple(out)


def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                    exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (except ``exclude``), in a group titled ``title``."""
    group = parser.add_argument_group(title) if title else parser
    known = parser._option_string_actions  # shared by the parser and all its groups
    for s in specs(cls):
        if s.name in exclude:
            continue
        default = None if s.required else s.to_flag(s.default)
        if s.meta.get("shared") and s.flag in known:
            other = known[s.flag]
            if other.dest != s.dest or other.default != default:
                raise TypeError(f"{cls.__name__}.{s.name}: shared {s.flag} differs in dest "
                                "or default from the flag already there")
            continue
        help_text = s.meta["help"].replace("%", "%%")
        if default is not None and s.kind != "bool":  # BooleanOptionalAction adds its own
            help_text += " (default: %(default)s)"
        names = [s.flag, *s.meta.get("aliases", ())]
        kw: dict[str, Any] = {"dest": s.dest, "help": help_text.strip() or None}
        if s.required:
            kw["required"] = True
        else:
            kw["default"] = default
        if s.kind == "bool":
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            for off in s.meta.get("no_aliases", ()):
                group.add_argument(off, dest=s.dest, action="store_false", help=argparse.SUPPRESS)
            continue
        if s.kind == "json":
            kw.update(type=_json, metavar="JSON")
        else:
            kw.update(type=s.type, choices=s.meta.get("choices"), metavar=s.meta.get("metavar"))
            if s.kind == "list":
                kw["nargs"] = s.meta.get("nargs", "*")
        group.add_argument(*names, **kw)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # argparse turns this into "argument --flag: not valid JSON ..." and exit code 2.
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None


def config_from_args(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` from the flags in ``ns`` (fields without a flag there keep their default), so
    ``__post_init__`` stays the one check; its ValueError comes back naming the flag."""
    kw = {s.name: s.to_field(getattr(ns, s.dest)) for s in specs(cls)
          if s.name not in overrides and hasattr(ns, s.dest)}
    try:
        return cls(**kw, **overrides)
    except ValueError as e:
        raise ValueError(name_flag(cls, str(e))) from None


def name_flag(cls: type, message: str) -> str:
    """``message`` led by the flag of the first field it names: the user typed flags."""
    found = [(m.start(), s) for s in specs(cls)
             if (m := re.search(rf"\b{s.name}\b", message))]
    if not found:
        return message
    _, s = min(found, key=lambda t: t[0])
    if message.startswith(f"{s.name}: "):
        message = message[len(s.name) + 2:]
    return f"{s.flag}: {message}"


def args_from_config(cfg: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """The argv that ``config_from_args`` turns back into ``cfg`` (only non-default fields, so a
    child's command line reads as what was changed)."""
    out: list[str] = []
    for s in specs(type(cfg)):
        value = getattr(cfg, s.name)
        if s.name in exclude or (not s.required and _same(value, s.default)):
            continue
        v = s.to_flag(value)
        if v is None:
            raise ValueError(f"{s.flag}: None has no spelling (the default is {s.default!r})")
        if s.kind == "bool":
            out.append(s.flag if v else "--no-" + s.flag[2:])
        elif s.kind == "json":
            out += [s.flag, json.dumps(v)]
        elif s.kind == "list":
            out += [s.flag, *map(str, v)]
        else:
            out += [s.flag, str(v)]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return type(a) is type(b) and a == b


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments above its line and at its end, joined."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for lineno, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if text.startswith("#"):
            if not text.lstrip("# ").startswith("--"):
                above.append(comments[lineno])
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and m.group(1) in names:
            out[m.group(1)] = " ".join([*above, comments.get(lineno, "")]).strip()
        above = []
    return out
