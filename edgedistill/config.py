"""Settings as data: a typed dataclass per command, filled from defaults, a TOML or JSON file and CLI flags.

Part of the shared core: every command's configuration (training, teacher cache, export, bench, pipeline and its
stages) is a :class:`FlagConfig`. Each field is declared once, with :func:`setting`, and that one declaration gives
its flag (``--field-name``), its help text, its key in a config file, its type check and its place in a stage's
fingerprint. Imports without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError
from edgedistill.system import check_device

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, metavar: str | None = None):
    """A config field with its help text (and optional flag metavar): ``lr: float = setting(1e-3, "peak lr")``."""
    metadata = {"help": help, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Load a JSON or TOML file that must hold a table; errors name the file and, for JSON, the line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such file")
    if path.suffix.lower() not in (".json", ".toml"):
        raise EdgeDistillError(f"{path}: expected a .json or .toml file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise EdgeDistillError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EdgeDistillError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        except RecursionError:
            raise EdgeDistillError(f"{path}: invalid JSON: nested too deeply") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            # tomllib's message ends with "(at line L, column C)": lift the line into the usual file:line prefix
            found = re.fullmatch(r"(.*) \(at line (\d+), column \d+\)", str(err))
            where = f"{path}:{found.group(2)}" if found else str(path)
            raise EdgeDistillError(f"{where}: invalid TOML: {str(err).splitlines()[0]}") from None
        except RecursionError:
            raise EdgeDistillError(f"{path}: invalid TOML: nested too deeply") from None
    if not isinstance(data, dict):
        raise EdgeDistillError(f"{path}: expected a table of fields, got {type(data).__name__}")
    return data


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _checked_value(name: str, expected: str, value: Any, where: str) -> Any:
    """``value`` for a field of type ``expected`` ("int", "float", "list[str]", ...), an int promoted to a float
    where a float is expected; anything else is an error naming ``where`` (the config file, if it set the value)."""
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected in _SCALARS:
        if type(value).__name__ != expected:
            raise EdgeDistillError(f"{where}{name}: expected a {expected}, got {value!r}")
        if expected == "float" and not math.isfinite(value):
            raise EdgeDistillError(f"{where}{name}: expected a finite number, got {value!r}")
        if name == "device":  # the same setting in every run configuration (training, teacher cache, pipeline)
            try:
                check_device(value)
            except EdgeDistillError as err:
                raise EdgeDistillError(f"{where}{err}") from None
        return value
    found = re.fullmatch(r"list\[(\w+)\]", expected)
    if found:
        item_type = found.group(1)
        if item_type not in _SCALARS:  # list[Path] ...: the field's own __post_init__ checks and converts it
            return value
        items = value if isinstance(value, list) else [value]
        # flags give lists of strings (``nargs="+"``): a list[int] field converts them in its __post_init__
        allowed = (str,) if item_type == "str" else (_SCALARS[item_type], str)
        if not all(isinstance(v, allowed) and not isinstance(v, bool) for v in items):
            noun = {"str": "strings", "int": "integers", "float": "numbers"}.get(item_type, item_type)
            raise EdgeDistillError(f"{where}{name}: expected a list of {noun}, got {value!r}")
    return value


@contextlib.contextmanager
def naming_file(config_file: str | None, from_file: Iterable[str]) -> Iterator[None]:
    """Prefix an error about a setting with the config file's name when the file, not a flag, set it.

    The error names the setting first, as the field (``lr: ...``) or as its flag (``--threads: ...``).
    """
    try:
        yield
    except EdgeDistillError as err:
        name = str(err).split(":", 1)[0].removeprefix("--").replace("-", "_")
        if config_file and name in set(from_file):
            raise EdgeDistillError(f"{config_file}: {err}") from None
        raise


class FlagConfig:
    """Shared by the run configurations: built from defaults, a config file and CLI flags; dumped as a dict."""

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> Any:
        """Defaults, then :meth:`preset` values, then the config file's keys, then explicit flags; unknown keys in
        the file are errors, and a wrongly typed value from the file is reported with the file's name."""
        from_file = cls.file_settings(config_file)
        flags = {k: v for k, v in overrides.items() if v is not None}
        chosen = {**from_file, **flags}
        values = {**cls.preset(chosen), **chosen}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            where = f"{config_file}: " if name in from_file and name not in flags else ""
            values[name] = _checked_value(name, types[name], value, where)
        with naming_file(config_file, set(from_file) - set(flags)):
            return cls(**values)

    @classmethod
    def file_settings(cls, config_file: str | None) -> dict[str, Any]:
        """The config file's settings by field name (``-`` in a key read as ``_``); an unknown key is an error."""
        if not config_file:
            return {}
        names = {f.name for f in dataclasses.fields(cls)}
        settings: dict[str, Any] = {}
        for key, value in load_mapping(config_file).items():
            name = key.replace("-", "_")
            if name not in names:
                raise EdgeDistillError(f"{config_file}: unknown setting '{key}'")
            settings[name] = value
        return settings

    def check_finite(self) -> None:
        """Refuse NaN and infinity in every float field: they pass every range check (``nan < 0`` is false) and
        then turn the run's losses into NaN. Called by :meth:`from_sources` and the ``__post_init__`` methods."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "float" and isinstance(value, float) and not math.isfinite(value):
                raise EdgeDistillError(f"{item.name}: expected a finite number, got {value!r}")

    @classmethod
    def preset(cls, chosen: dict[str, Any]) -> dict[str, Any]:
        """Values that replace the defaults given what the file and flags chose (none here)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------- flags

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, help_texts: dict[str, str] | None = None) -> None:
        """``--config FILE`` and one flag per field, defaulting to None so that the file fills what flags leave.

        Help comes from each field's :func:`setting` (``help_texts`` may add to fields declared without one)."""
        parser.add_argument(
            "--config", metavar="FILE", help="TOML or JSON file of settings (keys as the flags); flags win"
        )
        for item in dataclasses.fields(cls):
            flag = "--" + item.name.replace("_", "-")
            help_text = item.metadata.get("help") or (help_texts or {}).get(item.name, "")
            metavar = item.metadata.get("metavar")
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = item.default_factory()  # type: ignore[misc]
            else:
                default = None
            if item.type == "bool":
                parser.add_argument(flag, action="store_true", default=None, help=help_text)
            elif item.type.startswith("list"):
                parser.add_argument(flag, nargs="+", default=None, metavar=metavar or "VALUE", help=help_text)
            else:
                kind = {"int": int, "float": float, "str": str}[item.type]
                parser.add_argument(
                    flag, type=kind, default=None, metavar=metavar, help=f"{help_text} (default: {default!r})"
                )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Any:
        """The configuration that :meth:`add_flags`' parser read: defaults, then ``--config``, then the flags."""
        names = [item.name for item in dataclasses.fields(cls)]
        return cls.from_sources(getattr(args, "config", None), {name: getattr(args, name, None) for name in names})


