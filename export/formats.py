"""The one export skeleton every format runs, the small part each format fills in, and the registry of formats.

An export is the same for every format (:func:`export_artifacts`), top to bottom:

1. ``prepare``: what the format decides once, before writing anything (GGUF: the vocabulary and its
   pre-tokenizer, chosen by probing llama.cpp).
2. ``convert``: the float32 artifact, written under a temporary name in the output directory.
3. For each requested quantization, the float32 one last: ``derive`` it from the float32 artifact (the float32
   quantization is that artifact itself), ``check`` it in its own engine against PyTorch's answers and the Hugging
   Face tokenizer, and record it (size, digest, parity figures, the format's ``details``).
4. Hand back every artifact still under its temporary name: the caller publishes them together with the manifest
   (:func:`~edgedistill.export.manifest.publish_with_manifest`), or, on any error or interrupt, nothing is left.

A format is one :class:`ExportFormat` subclass in its own module (``gguf.py``, ``onnx.py``) and one entry in the
registry (``registry.py``), as llama.cpp's converter has one class per architecture over one shared writer. A
:class:`FormatRegistry` is fixed when built: a test that needs another format builds another registry
(:meth:`FormatRegistry.plus`) and hands it to the entry point, and the default one never changes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from edgedistill.deps import require
from edgedistill.errors import EdgeDistillError
from edgedistill.export.manifest import ArtifactRecord, StagedArtifact, tool_versions
from edgedistill.export.parity import ParityReport, Reference, Thresholds, TokenizerProbes
from edgedistill.files import remove_path, sha256_file, temp_path

if TYPE_CHECKING:
    from edgedistill.export.source import ExportSource, LoadedModel


class QuantSpec(Protocol):
    """One row of a format's quantization table: at least the parity thresholds that sit next to the exporter."""

    @property
    def thresholds(self) -> Thresholds: ...


@dataclass
class ExportJob:
    """What every step of one export sees.

    Attributes:
        source: where the model came from (name, licence, base model for the metadata and the manifest).
        loaded: the float32 model, its tokenizer and a checkpoint directory holding both.
        out: the output directory (claimed, writable); temporary files and directories live there too.
        reference: PyTorch's answers on the probe prompts.
        probes: the tokenizer probe strings and the Hugging Face ids every artifact's tokenizer must give.
        threads: CPU threads for the format's engine.
        progress: called with one line per step.
    """

    source: ExportSource
    loaded: LoadedModel
    out: Path
    reference: Reference
    probes: TokenizerProbes
    threads: int
    progress: Callable[[str], None]


@dataclass
class Conversion:
    """The float32 artifact (under its temporary name) and what the later steps reuse from making it.

    Attributes:
        path: the artifact (a file or a directory, as the format makes it).
        seconds: time the conversion took (``prepare`` excluded).
        bytes: the artifact's size (:meth:`ExportFormat.size`): the denominator of every size ratio.
        tools: versions of :attr:`ExportFormat.tools`, recorded with each artifact.
        plan: what the format's ``prepare`` returned.
    """

    path: Path
    seconds: float
    bytes: int
    tools: dict[str, str | None]
    plan: Any


class ExportFormat(ABC):
    """One artifact format: its quantization table and the steps that only it knows.

    Subclasses set the class attributes and implement :meth:`artifact_name`, :meth:`convert`, :meth:`derive`,
    :meth:`check` and :meth:`details`; :func:`export_artifacts` does the rest (temporary names, timing, records,
    progress lines, clean-up). A format object holds no state of its own: what one export decides lives in the
    :class:`Conversion` (its ``plan``), so one object serves every export.

    Attributes:
        name: the ``FORMAT`` argument, the manifest's ``format`` and the prefix of its progress lines.
        quants: ``--quant`` name -> its row (thresholds and how it is derived), in the order ``--help`` lists them.
        default_quants: what an export without ``--quant`` writes.
        base_quant: the name of the float32 conversion itself.
        modules: modules beyond torch and transformers the format needs, checked before the model loads.
        tools: distributions whose versions each record states.
        converted: what the progress line says the conversion did ("wrote the float32 file").
    """

    name: str
    quants: Mapping[str, QuantSpec]
    default_quants: tuple[str, ...]
    base_quant: str
    modules: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    converted: str = "converted the float32 model"

    @abstractmethod
    def artifact_name(self, model_name: str, quant: str) -> str:
        """The artifact's final name in the output directory."""

    def model_file(self, artifact: Path) -> Path:
        """The file a runtime opens (and the manifest's ``path`` and digest name): by default the artifact."""
        return artifact

    def size(self, artifact: Path) -> int:
        """The artifact's size in bytes: by default its model file's."""
        return self.model_file(artifact).stat().st_size

    def thresholds(self, quant: str) -> Thresholds:
        return self.quants[quant].thresholds

    def prepare(self, job: ExportJob) -> Any:
        """Checks and choices made once per export, before anything is written; the result becomes the
        :attr:`Conversion.plan`. By default nothing."""
        return None

    @abstractmethod
    def convert(self, job: ExportJob, plan: Any, base: Path) -> None:
        """Write the float32 artifact at ``base`` (a temporary name; nothing exists there yet)."""

    @abstractmethod
    def derive(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> None:
        """Write quantization ``quant`` at ``artifact`` (a temporary name) from ``conversion.path``."""

    @abstractmethod
    def check(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> ParityReport:
        """Run the artifact in the format's engine and judge it against ``job.reference`` and ``job.probes``."""

    @abstractmethod
    def details(
        self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path, parity_seconds: float
    ) -> dict[str, Any]:
        """The record's format-specific facts (how it was made, how parity ran, tool versions, timings)."""


class FormatRegistry(Mapping[str, ExportFormat]):
    """Format names -> formats, fixed when built. A new format is a new registry (:meth:`plus`), never a change
    to an existing one."""

    def __init__(self, *formats: ExportFormat) -> None:
        by_name: dict[str, ExportFormat] = {}
        for fmt in formats:
            if fmt.name in by_name:
                raise ValueError(f"export format {fmt.name!r} registered twice")
            unknown = [q for q in (fmt.base_quant, *fmt.default_quants) if q not in fmt.quants]
            if unknown:
                raise ValueError(f"export format {fmt.name!r}: {unknown[0]!r} is not in its quantization table")
            by_name[fmt.name] = fmt
        self._formats = MappingProxyType(by_name)

    def __getitem__(self, name: str) -> ExportFormat:
        return self._formats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._formats)

    def __len__(self) -> int:
        return len(self._formats)

    def plus(self, *formats: ExportFormat) -> FormatRegistry:
        """A new registry with these formats added after this one's."""
        return FormatRegistry(*self.values(), *formats)

    def select(self, name: str, quants: list[str]) -> tuple[ExportFormat, list[str]]:
        """The format called ``name`` and the quantizations to write: ``quants`` (already normalized), or the
        format's defaults when empty.

        Raises:
            EdgeDistillError: an unknown format or quantization, naming the choices.
        """
        if name not in self._formats:
            raise EdgeDistillError(f"format: unknown format {name!r}; choose from {', '.join(self._formats)}")
        fmt = self._formats[name]
        unknown = [q for q in quants if q not in fmt.quants]
        if unknown:
            raise EdgeDistillError(
                f"--quant: unknown {name} quantization {unknown[0]!r}; choose from {', '.join(fmt.quants)}"
            )
        return fmt, list(quants) or list(fmt.default_quants)

    def quant_help(self) -> str:
        """``gguf: f32,f16,... (default f16,q8_0,q4_k_m); onnx: ...`` for ``--help``."""
        return "; ".join(
            f"{name}: {','.join(fmt.quants)} (default {','.join(fmt.default_quants)})"
            for name, fmt in self._formats.items()
        )


# ------------------------------------------------------------------------------------------------ the skeleton


def export_artifacts(
    fmt: ExportFormat,
    source: ExportSource,
    loaded: LoadedModel,
    quants: list[str],
    out: Path,
    reference: Reference,
    probes: list[str],
    threads: int,
    progress: Callable[[str], None] = print,
) -> list[StagedArtifact]:
    """Convert ``loaded`` to ``fmt``, derive each requested quantization, and check and record every artifact.

    Args:
        fmt: the format.
        source: where the model came from (recorded in the manifest and the metadata).
        loaded: the float32 model, its tokenizer and a checkpoint directory holding both.
        quants: names from ``fmt.quants``.
        out: the output directory (exists, writable); temporary files live there too.
        reference: PyTorch's answers on the probe prompts.
        probes: tokenizer probe strings.
        threads: CPU threads for the format's engine.
        progress: called with one line per step.

    Returns:
        The checked artifacts, still under temporary names: the caller publishes them (or discards them). On any
        error or interrupt every temporary is removed before it propagates.
    """
    for module in fmt.modules:
        require(module)
    tools = tool_versions(*fmt.tools)
    job = ExportJob(source, loaded, out, reference, TokenizerProbes.of(loaded.tokenizer, probes), threads, progress)
    plan = fmt.prepare(job)
    base = temp_path(out, fmt.artifact_name(source.name, fmt.base_quant))
    temporaries, staged = [base], []
    try:
        conversion = _convert(fmt, job, plan, base, tools)
        # Derive from the float32 artifact; the float32 artifact itself, when asked for, is checked last.
        for quant in sorted(quants, key=lambda name: name == fmt.base_quant):
            staged.append(_stage(fmt, job, conversion, quant, temporaries))
    except BaseException:
        for path in temporaries:
            remove_path(path)
        raise
    if fmt.base_quant not in quants:
        remove_path(base)
    return staged


def _convert(fmt: ExportFormat, job: ExportJob, plan: Any, base: Path, tools: dict[str, str | None]) -> Conversion:
    started = time.perf_counter()
    fmt.convert(job, plan, base)
    seconds = time.perf_counter() - started
    conversion = Conversion(base, seconds, fmt.size(base), tools, plan)
    job.progress(f"{fmt.name}: {fmt.converted} ({conversion.bytes / 1e6:.1f} MB) in {seconds:.1f}s")
    return conversion


def _stage(
    fmt: ExportFormat, job: ExportJob, conversion: Conversion, quant: str, temporaries: list[Path]
) -> StagedArtifact:
    """Derive (unless it is the float32 artifact), check and record one quantization."""
    final = job.out / fmt.artifact_name(job.source.name, quant)
    if quant == fmt.base_quant:
        artifact, seconds = conversion.path, conversion.seconds
    else:
        started = time.perf_counter()
        artifact = temp_path(job.out, final.name)
        temporaries.append(artifact)
        fmt.derive(job, conversion, quant, artifact)
        seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = fmt.check(job, conversion, quant, artifact)
    parity_seconds = time.perf_counter() - started
    record = ArtifactRecord(
        path=fmt.model_file(final).relative_to(job.out).as_posix(),
        bytes=fmt.size(artifact),
        sha256=sha256_file(fmt.model_file(artifact)),
        format=fmt.name,
        quantization=quant,
        parameters=job.loaded.parameters,
        f32_bytes=conversion.bytes,
        seconds=seconds,
        parity=report.to_dict(),
        source=job.source.describe(),
        details=fmt.details(job, conversion, quant, artifact, parity_seconds),
    )
    job.progress(
        f"{fmt.name}: {final.name}: {record.bytes / 1e6:.1f} MB in {seconds:.1f}s; parity "
        f"{'passed' if report.passed else 'FAILED: ' + '; '.join(report.failures)}"
    )
    return StagedArtifact(artifact, final, record)
