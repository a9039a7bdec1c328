"""What a pipeline stage is, and what it is given.

A stage is one object (:class:`Stage`) that declares

* ``settings``: a dataclass of the settings it introduces, each declared with :func:`~edgedistill.config.setting`
  (help text beside the field). They become ``edgedistill pipeline`` flags and TOML keys (the registry assembles
  the flat pipeline config from every stage's settings), and they make its fingerprint: a stage is redone when its
  own settings or an earlier stage's change;
* ``outputs``: the paths under the run directory it writes (removed when it is redone);
* ``record``: the dataclass :meth:`Stage.run` returns, stored in ``pipeline.json`` as the stage's ``outputs``;
* :meth:`Stage.run` ``(settings, upstream) -> record``;
* :meth:`Stage.report`: its part of ``report.md``, as :class:`Section` objects.

A stage reads its own settings from ``settings``, and anything else from :class:`Upstream`: the run directory, the
run-wide settings (:class:`RunSettings`), another stage's settings by their class, earlier stages' records.
Imports without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgedistill.config import FlagConfig, setting
from edgedistill.errors import EdgeDistillError

MANIFEST = "pipeline.json"
CONFIG_FILE = "pipeline.toml"
REPORT = "report.md"

S = TypeVar("S")
R = TypeVar("R", bound="Record")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class RunSettings:
    """Settings of the whole run, not of one stage: where it writes and what it runs on (in no fingerprint: the
    same settings on another device or thread count give the same run)."""

    out: str = setting(
        "runs/pipeline", "run directory: pipeline.toml, pipeline.json, teacher/, students/, export/, bench/, report.md"
    )
    device: str = setting("auto", "auto, cpu or cuda (training and the teacher)")
    threads: int = setting(0, "training and export threads (0: all)")
    # measured on 2 cores (tiny, 8 steps): one run on 2 threads 767 tokens/s, two runs on 1 thread each 915 in all
    workers: int = setting(
        0,
        "distillation runs, prunings and exports at once, each in its own process with its share of the threads "
        "(0: 2 on a CPU with at least 2 cores, else 1)",
    )
    full: bool = setting(
        False,
        "start from the larger budget (twice the steps and data, 32k held-out tokens, a longer bench at threads "
        "1,2,4 where there are CPUs for them: about an hour on 2 cores) instead of the default (~20-30 min)",
    )

    def __post_init__(self) -> None:
        check_at_least_zero(self, "threads", "workers")


@dataclass
class NoSettings:
    """The settings of a stage that has none of its own (it reads other stages' through :class:`Upstream`)."""


def check_strings(settings: Any, *names: str) -> None:
    """Each named field as a list of strings (a lone string becomes a list of one), or an error naming it."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise EdgeDistillError(f"{name}: expected a list of strings, got {value!r}")
        setattr(settings, name, value)


def check_positive(settings: Any, *names: str) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise EdgeDistillError(f"{name}: expected a positive integer, got {getattr(settings, name)!r}")


def check_at_least_zero(settings: Any, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 0:
            raise EdgeDistillError(f"{name}: expected 0 or a positive integer, got {getattr(settings, name)!r}")


class PipelineSettings(FlagConfig):
    """Base of the pipeline config class that a registry assembles (:meth:`Registry.config_class
    <edgedistill.stages.registry.Registry>`): one flat dataclass of :class:`RunSettings` and every stage's settings,
    so that each setting is one flag and one TOML key. The assembled class sets the three class attributes."""

    parts: ClassVar[tuple[type[Any], ...]] = ()  # RunSettings, then each stage's settings class, in stage order
    stage_settings: ClassVar[Mapping[str, type[Any]]] = {}  # stage name -> its settings class, in stage order
    full_budget: ClassVar[Mapping[str, Any]] = {}  # the stages' --full values

    def __post_init__(self) -> None:
        # each part checks (and normalizes: a lone string into a list, "2" into 2) its own fields
        for kind in self.parts:
            checked = self.part(kind)
            for item in dataclasses.fields(kind):
                setattr(self, item.name, getattr(checked, item.name))

    def part(self, kind: type[S]) -> S:
        """The values of settings class ``kind`` as an instance of it (typed, checked by its ``__post_init__``)."""
        if kind not in self.parts:
            raise TypeError(f"{kind.__name__} is not a settings class of this pipeline")
        return kind(**{item.name: getattr(self, item.name) for item in dataclasses.fields(kind)})  # type: ignore

    @classmethod
    def preset(cls, chosen: dict[str, Any]) -> dict[str, Any]:
        """``full``: the stages' :attr:`Stage.full_budget` replace the defaults (the config file and flags win)."""
        return dict(cls.full_budget) if chosen.get("full") else {}

    def to_toml(self) -> str:
        """The resolved settings as a TOML file that reproduces this run (``--config``), grouped by stage."""
        lines = ["# edgedistill pipeline: every setting of this run (edgedistill pipeline --config THIS_FILE)"]
        owners = {kind: name for name, kind in self.stage_settings.items()}
        for kind in self.parts:
            if not dataclasses.fields(kind):
                continue
            lines.append(f"# {owners[kind]} stage" if kind in owners else "# the run")
            for item in dataclasses.fields(kind):
                lines.append(f"{item.name} = {json.dumps(getattr(self, item.name))}")
        return "\n".join(lines) + "\n"

    def fingerprint(self, stage: str) -> str:
        """A hash of the settings ``stage`` and the stages before it declare."""
        names = list(self.stage_settings)
        keys: list[str] = []
        for name in names[: names.index(stage) + 1]:
            keys.extend(item.name for item in dataclasses.fields(self.stage_settings[name]))
        settings = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ records
class Record:
    """Base of the stages' records: dataclasses stored in ``pipeline.json`` as plain JSON and read back typed."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        return _from_plain(cls, data)


def _from_plain(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as ``kind``: dataclasses field by field (unknown keys ignored, a missing ``X | None``
    is None), ``X | None``, ``list[X]`` and ``dict[str, X]`` item by item; anything else as it is."""
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        values = {}
        for name in (f.name for f in dataclasses.fields(kind)):
            if name in value:
                values[name] = _from_plain(hints[name], value[name])
            elif _optional(hints[name]):  # records leave out what they do not have (the teacher's cache)
                values[name] = None
        return kind(**values)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _from_plain(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [_from_plain(args[0], v) for v in value]
    if origin is dict:
        return {k: _from_plain(args[1], v) for k, v in value.items()}
    return value


def _optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


# ------------------------------------------------------------------------------------------------ layout
class Layout:
    """The run directory and the pipeline's own files in it; each stage names its outputs relative to it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.manifest = out / MANIFEST
        self.config = out / CONFIG_FILE
        self.report = out / REPORT

    def path(self, relative: str | Path) -> Path:
        return self.out / relative


def log(message: str) -> None:
    """A progress line on stderr (stdout is the command's result)."""
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically (the parent directory made first)."""
    from edgedistill.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file a stage wrote, or ``{}`` when it is not there (the report of a partial run)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------ report parts
@dataclass(frozen=True)
class Section:
    """A stage's part of ``report.md``.

    Attributes:
        order: where it goes: sections are sorted by it (preamble 0-9, the seed's tables 10-39, the rest after).
        heading: its ``##`` heading; None for a paragraph of the preamble, before the first heading. Sections of
            the same heading (from different stages) are joined under one, in order.
        lines: its Markdown lines.
    """

    order: float
    heading: str | None
    lines: list[str]


# ------------------------------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class Upstream:
    """What a stage is given besides its own settings.

    Attributes:
        layout: the run directory.
        config: every setting of the run (the assembled pipeline config); read it typed with :meth:`settings`.
        records: each finished stage's stored record, by stage name (read them typed with :meth:`record`).
        stages: the stages of this run, in order (the report walks them for their sections).
    """

    layout: Layout
    config: PipelineSettings
    records: Mapping[str, Mapping[str, Any]]
    stages: Sequence[Stage[Any, Any]]

    @property
    def run(self) -> RunSettings:
        return self.settings(RunSettings)

    def settings(self, kind: type[S]) -> S:
        """The run's values of the settings class ``kind`` (a stage's, or :class:`RunSettings`)."""
        return self.config.part(kind)

    def stage_settings(self, stage: str) -> Any:
        """Stage ``stage``'s settings, by its name: for a stage that reads a later stage's setting without importing
        its module (which imports this one's); annotate the result with the class under ``TYPE_CHECKING``."""
        if stage not in self.config.stage_settings:
            raise EdgeDistillError(f"this pipeline has no stage {stage!r}")
        return self.settings(self.config.stage_settings[stage])

    def record(self, stage: str, kind: type[R]) -> R:
        """Stage ``stage``'s record, or an error saying that it has not run."""
        if stage not in self.records:
            raise EdgeDistillError(f"stage {stage!r} has not run; run it first (or omit --stages)")
        try:
            return kind.from_dict(self.records[stage])
        except (TypeError, KeyError, AttributeError, StopIteration) as err:
            raise EdgeDistillError(
                f"{self.layout.manifest}: the {stage} stage's record is unreadable ({err}); remove it to start over"
            ) from None


class Stage(ABC, typing.Generic[S, R]):
    """A pipeline stage: subclass it, set the four class attributes, write :meth:`run` (and :meth:`report`)."""

    name: ClassVar[str]
    settings: ClassVar[type[Any]]  # a dataclass of setting() fields: flags, TOML keys, fingerprint
    record: ClassVar[type[Record]]
    outputs: ClassVar[tuple[str, ...]]  # paths under the run directory, removed when the stage is redone
    # Values of its settings that --full starts from (the config file and flags still win).
    full_budget: ClassVar[Mapping[str, Any]] = {}

    @abstractmethod
    def run(self, settings: S, upstream: Upstream) -> R:
        """Do the stage's work under ``upstream.layout`` and return its record."""

    def report(self, upstream: Upstream) -> list[Section]:
        """Its sections of ``report.md`` (none by default), read from the files it wrote."""
        return []

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
