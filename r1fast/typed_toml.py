"""Typed configuration: dataclasses loaded from TOML with dotted command-line overrides.

Every component has its own ``@dataclass`` config with a docstring per field (torchtitan
style). A recipe is a TOML file whose tables mirror the nesting of the top-level config::

    [algo]
    kl_coef = 0.001

and any field can be overridden on the command line as ``--algo.kl_coef=0.001``. Values are
parsed as TOML literals (``--run.steps=20``, ``--algo.kl="k3"`` or ``--algo.kl=k3``), then
checked against the field's type. An unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted key, with a suggestion for near-miss spellings.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger("r1fast")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


def _unknown_key(key: str, prefix: str, known: Sequence[str]) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str, base: Any = None, finite: bool = True) -> Any:
    """Check ``value`` against the annotation ``tp`` (after from __future__ annotations were
    resolved), converting only where lossless (int -> float, list -> tuple). ``base`` is the
    default a nested dataclass table is merged onto. A float must be finite (TOML's ``nan`` and
    ``inf`` are rejected) unless ``finite`` is False (a field with :data:`ALLOW_NONFINITE`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # TOML has no null: the string "none" sets an optional field to None
        if (value is None or value == "none") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, base, finite)
            except ConfigError as e:
                errors.append(str(e))
        optional = ' (or "none")' if type(None) in args else ""
        if len(errors) == 1:  # Optional[X]: X's own message, not typing's repr
            raise ConfigError(errors[0] + optional)
        raise ConfigError(f"config key '{key}': {value!r} fits none of: "
                          + "; ".join(e.split(": ", 1)[-1] for e in errors) + optional)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", finite=finite)
                         for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", finite=finite)
                         for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", finite=finite) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table, got {value!r}")
        args = typing.get_args(tp)
        item = args[1] if len(args) == 2 else Any  # dict[str, float]: each value is checked
        return {k: _coerce(v, item, f"{key}.{k}", finite=finite) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _coerce_table(value, tp, key, base)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if finite and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return value if isinstance(value, DefaultFloat) else float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _coerce_table(value: Any, tp: type, key: str, base: Any) -> Any:
    """A nested dataclass from a table, merged onto ``base`` (the field's default) or onto
    ``tp.preset(name)`` when the table says ``preset = name``: the fields the table names
    replace the base's, a dict-valued one whole (``weights = {accuracy = 1.0}`` is accuracy
    alone, not the default's parts plus accuracy), unless dotted override keys made it
    (:class:`_Edits`: ``--reward.weights.format=0.2`` edits the weights there are)."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a table, got {value!r}")
    value = dict(value)
    if "preset" in value and callable(getattr(tp, "preset", None)):  # [model] preset = ".."
        name = value.pop("preset")
        try:
            base = tp.preset(name)
        except ValueError as e:
            raise ConfigError(f"config key '{key}.preset': {e}") from e
    if dataclasses.is_dataclass(base) and not isinstance(base, type):
        fields = _shallow_fields(base)
        value = {**fields, **{k: _edited(v, fields.get(k)) for k, v in value.items()}}
    return from_dict(tp, value, prefix=key + "." if key else "")


class _Edits(dict):
    """A table made by dotted override keys (``--reward.weights.format=0.2``): it edits the
    table it lands on (a recipe's, else the default), key by key, where a written table
    (``--reward.weights={format = 0.2}``, or a recipe's) replaces it."""


def _edited(value: Any, base: Any) -> Any:
    """``value``, or for :class:`_Edits` over a dict ``base``, ``base`` with those edits."""
    return {**base, **value} if isinstance(value, _Edits) and isinstance(base, dict) else value


def _shallow_fields(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


class DefaultFloat(float):
    """A float field's default, marked as nobody's choice: it keeps its type through a table
    merged onto it (a value a recipe or override writes is a plain float), so a check can ask
    whether the user chose the value. Pickled or deep-copied (a spawned process) it is a plain
    float; code that hands it to torch state a checkpoint saves passes ``float(value)``, since
    torch's weights-only load refuses any class, ``float`` included (r1fast.policy.optim)."""

    def __reduce__(self):
        return float, (float(self),)


NAMES_ELSEWHERE = "names_elsewhere"
"""``field(metadata={NAMES_ELSEWHERE: {"low_var_kl": "verl's name for 'k3'"}})``: a value
another tool spells that way is an error saying what it is here (not only "must be one of");
written as the literal key where a module may not import this one (r1fast.ops)."""


ALLOW_NONFINITE = {"allow_nonfinite": True}
"""``field(metadata=ALLOW_NONFINITE)`` on a float field lets it be ``inf``/``nan``; every
other float of a config must be finite."""

FLATTEN = {"flatten": True}
"""``field(metadata=FLATTEN)`` on a nested-dataclass field: its fields are read and written
directly in the parent's table (``[algo] kl_coef`` for ``AlgoConfig.objective.kl_coef``), so a
component config can be embedded whole without changing the recipe keys."""


def _flattened(cls: type) -> dict[str, str]:
    """Key in ``cls``'s table -> the flattened field that holds it."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flatten"):
            child = typing.get_type_hints(cls)[f.name]
            out.update({c.name: f.name for c in dataclasses.fields(child) if c.init})
    return out


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict. Unset fields keep their defaults; a nested
    table is merged onto that field's default (so ``[model] hidden_size = 32`` changes one field
    of the default model), or onto ``cls.preset(name)`` when the table has ``preset = name``.
    Keys of a :data:`FLATTEN` field's dataclass are gathered into that field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    owner = _flattened(cls)
    data = dict(data)
    # the FLATTEN fields' own tables as written (a merged base holds the field's object instead)
    written = {k: v for k, v in data.items() if k in owner.values() and isinstance(v, dict)}
    for key in [k for k in data if k in owner and k not in fields]:
        table = written.get(owner[key], {})
        if key in table and table[key] != data[key]:
            # both spellings were written (recipe and override, say): neither may win quietly
            raise ConfigError(f"config key '{prefix}{key}' = {data[key]!r} is also given as "
                              f"'{prefix}{owner[key]}.{key}' = {table[key]!r}; write it once")
        holder = data.get(owner[key], {})  # a table, or the field's object from a merged base
        if dataclasses.is_dataclass(holder):
            holder = _shallow_fields(holder)
        data[owner[key]] = {**holder, key: data.pop(key)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, prefix, sorted((set(fields) - set(owner.values()))
                                                   | set(owner)))
        base = _field_default(fields[key]) if isinstance(value, dict) else None
        value = _edited(value, base)
        # a FLATTEN field's keys are named as the user wrote them: in the parent's table
        name = prefix.rstrip(".") if fields[key].metadata.get("flatten") else prefix + key
        elsewhere = fields[key].metadata.get(NAMES_ELSEWHERE, {})
        if isinstance(value, str) and value in elsewhere:
            raise ConfigError(f"config key '{name}': {value!r} is {elsewhere[value]}")
        kwargs[key] = _coerce(value, hints[key], name, base,
                              finite=not fields[key].metadata.get("allow_nonfinite", False))
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config '{prefix.rstrip('.') or cls.__name__}': {e}") from e
    except ValueError as e:
        # a check that names its field bare ("clip_low must be ...", from an op's config that
        # [algo] embeds flat) is reported under the key the user wrote: "algo.clip_low ..."
        first = str(e).split(" ", 1)[0]
        if isinstance(e, ConfigError) or not prefix or first not in fields:
            raise
        raise ConfigError(prefix + str(e)) from e


def to_dict(cfg: Any) -> Any:
    """A plain nested dict (TOML/JSON-serialisable) of a config dataclass; the fields of a
    :data:`FLATTEN` field appear in the parent's table."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        return cfg
    out = {}
    for f in dataclasses.fields(cfg):
        value = to_dict(getattr(cfg, f.name))
        if f.metadata.get("flatten"):
            out.update(value)
        else:
            out[f.name] = value
    return out


def _parse_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def parse_overrides(args: Sequence[str]) -> dict:
    """``["--algo.kl_coef=0.001", "--run.steps", "5"]`` -> ``{"algo": {"kl_coef": 0.001}, ...}``."""
    out: dict = {}
    given: dict[str, str] = {}  # key -> the text it was first given
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{body} has no value")
            key, text = body, args[i + 1]
            i += 1
        i += 1
        node = out
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is malformed")
        for p in parts[:-1]:
            node = node.setdefault(p, _Edits())
            if not isinstance(node, dict):
                raise ConfigError(f"override key {key!r} conflicts with another override")
        if key in given and given[key] != text:  # the last one is used: say so
            log.warning("override --%s is given twice (%s, then %s): the last one is used",
                        key, given[key], text)
        given[key] = text
        value = _parse_literal(text)
        if isinstance(node.get(parts[-1]), _Edits) and node[parts[-1]]:
            log.warning("override --%s=%s replaces the earlier --%s.KEY edits (%s)", key, text,
                        key, ", ".join(sorted(node[parts[-1]])))
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict, prefix: str = "") -> dict:
    """``base`` with the overrides ``extra`` applied: a table made by dotted keys
    (:class:`_Edits`) edits the table it lands on, key by key; a written one replaces it
    (``--reward.weights={accuracy = 1.0}`` over a recipe's weights is those weights alone),
    with a warning naming the recipe's keys it drops."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, _Edits) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, f"{prefix}{k}.")
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            dropped = sorted(set(out[k]) - set(v))
            if dropped:
                log.warning("override --%s%s={...} replaces the recipe's table, whose %s %s "
                            "dropped (to change one key, write --%s%s.KEY=VALUE)", prefix, k,
                            ", ".join(dropped), "is" if len(dropped) == 1 else "are", prefix, k)
        out[k] = v
    return out


def read(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """The raw nested dict of an optional TOML recipe plus dotted overrides (what the user
    wrote, before defaults: callers can tell whether a table was given at all)."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path} is not valid TOML: {e}") from e
    return merge(data, parse_overrides(overrides))


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional TOML recipe plus dotted overrides."""
    return from_dict(cls, read(path, overrides))


def dump_toml(cfg: Any) -> str:
    """Render a config as TOML (tables for nested dataclasses), for run folders."""
    lines: list[str] = []

    def key(k: str) -> str:  # a bare TOML key, or a quoted one ("a.b", "with space")
        return k if _BARE_KEY.fullmatch(k) else json.dumps(k, ensure_ascii=False)

    def fmt(v: Any) -> str:
        if v is None:
            return '"none"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):  # JSON's escapes are TOML's: newlines, quotes, control chars
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    def emit(d: dict, prefix: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{key(k)} = {fmt(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(to_dict(cfg), "")
    return "\n".join(lines)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def config_changes(saved: str, now: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` of every field in which two
    :func:`dump_toml` texts differ (a key only one of them has counts, with None)."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            name = f"{prefix}{k}"
            out.update(flat(v, name + ".") if isinstance(v, dict) else {name: v})
        return out

    a, b = flat(tomllib.loads(saved)), flat(tomllib.loads(now))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
