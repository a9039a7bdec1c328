"""The stages of ``edgedistill pipeline``, in order, and the pipeline config assembled from their settings.

Adding a stage is one module (a :class:`~edgedistill.stages.base.Stage` with its settings, record, outputs, run and
report part) and one line in :data:`DEFAULT`. A :class:`Registry` is a value: :meth:`Registry.with_stage` returns a
new one, so a test or a plugin adds a stage without touching the default (nothing registers into shared state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from edgedistill.stages.base import PipelineSettings, RunSettings, Stage
from edgedistill.stages.bench import BenchStage
from edgedistill.stages.distill import DistillStage
from edgedistill.stages.export import ExportStage
from edgedistill.stages.report import ReportStage
from edgedistill.stages.teacher import TeacherStage


class Registry:
    """Pipeline stages in the order they run, and :attr:`config_class`: one flat config dataclass of
    :class:`RunSettings` and every stage's settings (each field one flag and one TOML key)."""

    def __init__(self, stages: Iterable[Stage[Any, Any]]) -> None:
        self.stages: tuple[Stage[Any, Any], ...] = tuple(stages)
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stage {repeated[0]!r} is registered twice")
        self.config_class: type[PipelineSettings] = assemble_config(self.stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def __iter__(self) -> Iterator[Stage[Any, Any]]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, name: str) -> Stage[Any, Any]:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def with_stage(self, stage: Stage[Any, Any], before: str | None = None) -> Registry:
        """A new registry with ``stage`` added before stage ``before`` (at the end when None)."""
        at = self.names.index(before) if before is not None else len(self.stages)
        return Registry([*self.stages[:at], stage, *self.stages[at:]])

    def stage_keys(self) -> dict[str, tuple[str, ...]]:
        """The settings each stage declares (its part of the fingerprints: its own and every later stage's)."""
        return {stage.name: tuple(f.name for f in dataclasses.fields(stage.settings)) for stage in self.stages}


def _type_name(kind: Any) -> str:
    """A field's type as the string FlagConfig reads ("int", "list[str]"), also when it is not a string already."""
    if isinstance(kind, str):
        return kind
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _copied(item: dataclasses.Field[Any]) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=item.default_factory, metadata=item.metadata)
    return dataclasses.field(default=item.default, metadata=item.metadata)


def assemble_config(stages: tuple[Stage[Any, Any], ...]) -> type[PipelineSettings]:
    """The ``PipelineConfig`` dataclass of these stages: RunSettings' fields, then each stage's, in stage order."""
    parts = (RunSettings, *(stage.settings for stage in stages))
    owners: dict[str, str] = {}
    fields: list[tuple[str, str, Any]] = []
    for part in parts:
        if not dataclasses.is_dataclass(part):
            raise TypeError(f"{part!r}: a stage's settings must be a dataclass (of setting() fields)")
        for item in dataclasses.fields(part):
            if item.name in owners:
                raise ValueError(f"setting {item.name!r} is declared by both {owners[item.name]} and {part.__name__}")
            owners[item.name] = part.__name__
            fields.append((item.name, _type_name(item.type), _copied(item)))
    full_budget: dict[str, Any] = {}
    for stage in stages:
        foreign = [k for k in stage.full_budget if owners.get(k) != stage.settings.__name__]
        if foreign:
            raise ValueError(f"stage {stage.name!r}: full_budget sets {foreign[0]!r}, not one of its settings")
        full_budget.update(stage.full_budget)
    namespace = {
        # this module: dataclasses resolves the string field types in the class's module, which must be imported
        # already (edgedistill.pipeline is not while `import edgedistill.stages` runs)
        "__module__": __name__,
        "__doc__": "Every choice of a pipeline run: RunSettings, then the settings of "
        + ", ".join(f"{stage.name} ({stage.settings.__name__})" for stage in stages)
        + ". Each field is a flag (``--field-name``) and a key of the TOML config file.",
        "parts": parts,
        "stage_settings": {stage.name: stage.settings for stage in stages},
        "full_budget": full_budget,
    }
    return dataclasses.make_dataclass("PipelineConfig", fields, bases=(PipelineSettings,), namespace=namespace)


# The pipeline: one line per stage, in the order they run.
DEFAULT = Registry(
    [
        TeacherStage(),
        DistillStage(),
        ExportStage(),
        BenchStage(),
        ReportStage(),
    ]
)
