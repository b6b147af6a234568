"""The one validation layer: frozen-dataclass configs and records from dicts, YAML, TOML or JSON, typed and
bounded, with errors that name the field, the bad value and the valid range.

A field declares its bounds with ``bounded(...)`` (a ``dataclasses.field`` carrying a ``Bounds``);
``from_dict(cls, data, where)`` checks keys, types (recursively through nested dataclasses, lists, tuples
and dicts) and bounds; ``check_bounds(obj)`` checks an already built object (call it in ``__post_init__``
so direct construction is validated too). Every face (CLI flags, study files, web forms, JSON records on
disk) goes through ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from xailab.errors import ConfigError, did_you_mean

C = TypeVar("C")
# Image sizes anywhere (configs, run records): every model needs a few pixels after its poolings, and the
# largest guards against a typo or a hostile file allocating terabytes (100000 x 100000 images).
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 2048

# A model option set to "cell:<model>" names the trained weights of another cell of the same study: the study
# runner resolves it (``xailab.study.runner.resolve_cell_references``); a model refuses it elsewhere, and the
# report names it.
CELL_REFERENCE = "cell:"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Bounds:
    """The valid range of a number (``low``/``high``, each inclusive unless ``*_open``) or a set of ``choices``.

    Numbers must also be finite; ``None`` (for an optional field) is always accepted.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        """The valid range in words: ``>= 1``, ``in [0, 1)``, ``one of 1, 3``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "a finite number"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is valid (None always is: optional fields carry None); a list or tuple is valid
        when every item is."""
        if value is None:
            return True
        if isinstance(value, list | tuple):
            return all(self.contains(v) for v in value)
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, name: str, value: Any) -> None:
        """Raise ``ConfigError`` naming ``name``, the bad value and the valid range unless ``value`` is valid."""
        if not self.contains(value):
            raise ConfigError(f"{name}: {value!r} is out of range; valid: {self.describe()}")


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with a help text and bounds: ``epochs: int = bounded(10, low=1, help="...")``."""
    metadata: dict[str, Any] = {"help": help}
    if low is not None or high is not None or choices is not None:
        metadata["bounds"] = Bounds(low, high, low_open, high_open, choices)
    return dataclasses.field(default=default, metadata=metadata)


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    """The ``Bounds`` a field declared with ``bounded`` (None if it declared none)."""
    return f.metadata.get("bounds")


def check_bounds(obj: Any, where: str | None = None) -> None:
    """Check every bounded field of dataclass instance ``obj``; the error names ``where.field``."""
    where = where or type(obj).__name__
    for f in dataclasses.fields(obj):
        bounds = field_bounds(f)
        if bounds is not None:
            bounds.check(_key(where, f.name), getattr(obj, f.name))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml`` or ``.toml`` file into a dict, with an error naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(
                f"config file {path}: unknown extension {path.suffix!r}; use .yaml, .yml or .toml"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _key(where: str, key: str) -> str:
    """``where.key``, or ``where key`` when ``where`` ends with a colon (``runs/a/config.json: train``)."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to ``annotation`` where it is lossless (int -> float, list -> tuple), else raise
    naming the key; nested dataclasses are built with ``from_dict``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {_short(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{name}: {_short(value)} is not valid; choose one of {', '.join(map(repr, args))}"
            )
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_short(value)}")
        return from_dict(annotation, value, where=name)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{name}: expected {annotation.__name__}, got {_short(value)}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, str) and origin is list and args and args[0] is str:
            value = [value]  # one name where a list of names goes (``models: resnet18``)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {_short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, int]
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {_short(value)}")
            items = [
                _check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item = args[0] if args else Any
            items = [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if (origin or annotation) is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_short(value)}")
        if len(args) == 2 and args[1] is not Any:
            return {k: _check_type(f"{name}.{k}", v, args[1]) for k, v in value.items()}
        return dict(value)
    return value


def from_dict(cls: type[C], data: Any, where: str = "config") -> C:
    """Build dataclass ``cls`` from ``data``: unknown or missing keys, bad types and out-of-range values raise
    ``ConfigError`` naming ``where.key``, the bad value and what is valid."""
    name = where.rstrip(":")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {_short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # C is a dataclass
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        hint = did_you_mean(key, fields, n=1, cutoff=0.6)  # config keys: difflib's stricter default
        raise ConfigError(f"{name}: unknown key {key!r}.{hint} Valid keys: {', '.join(fields)}.")
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{name}: missing required key(s) {', '.join(missing)}")
    values = {k: _check_type(_key(where, k), v, hints[k]) for k, v in data.items()}
    for k, v in values.items():
        bounds = field_bounds(fields[k])
        if bounds is not None:
            bounds.check(_key(where, k), v)
    try:
        return cls(**values)
    except ConfigError as e:  # a cross-field check of __post_init__: say where the values came from
        message = str(e)
        raise ConfigError(message if message.startswith(name) else f"{name}: {message}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain JSON-able dict."""
    return dataclasses.asdict(obj)


# A name that becomes a folder (a study, a run): one path part of portable characters, never "." or "..".
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,127}")


def folder_name(value: Any, where: str) -> str:
    """``value`` checked to be usable as one folder name under an output folder: letters, digits and
    ``. _ = + , @ -``, not starting with a dot, at most 128 characters; anything that could climb out of the
    folder (``../x``, ``/abs``, ``a/b``) raises ``ConfigError`` naming ``where`` and the value."""
    if not isinstance(value, str) or not _FOLDER_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r} cannot be a folder name; use letters, digits and . _ = + , @ - "
            "(no slash, not starting with a dot, at most 128 characters)"
        )
    return value


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against type ``annotation`` (coerced where lossless, e.g. int -> float), or a
    ``ConfigError`` naming ``name`` and the value: the check ``from_dict`` runs on each field, for values that
    are not fields of a dataclass (a model's options, checked against its factory's annotations)."""
    return _check_type(name, value, annotation)


def cell_references(options: dict[str, Any]) -> dict[str, str]:
    """The options of one model that name another cell's weights: option -> the referenced model
    (``{"densenet_weights": "cell:densenet169"}`` -> ``{"densenet_weights": "densenet169"}``; a resolved
    ``"cell:densenet169@<recipe hash>"`` gives the model too)."""
    return {
        option: value[len(CELL_REFERENCE) :].split("@")[0]
        for option, value in options.items()
        if isinstance(value, str) and value.startswith(CELL_REFERENCE)
    }
