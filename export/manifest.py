"""``DIR/manifest.json``: one record per exported artifact, merged with what earlier exports put in DIR.

Artifacts are published by renaming a finished temporary file onto its final name, together with the manifest
through one journal (:func:`edgedistill.files.publish_together`): a kill at any moment leaves, once the next export
claims the directory, either the old files and the old manifest or the new files and the new manifest.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.errors import EdgeDistillError
from edgedistill.files import publish_together, remove_path

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


@dataclass
class ArtifactRecord:
    """One exported file and its parity figures.

    Attributes:
        path: the model file, relative to the manifest's directory.
        bytes: its size (for ONNX including external weight data).
        sha256: hex digest of the model file.
        format: ``"gguf"`` or ``"onnx"``.
        quantization: the quantization name as given to ``--quant``.
        parameters: parameter count of the PyTorch model (tied weights once).
        f32_bytes: size of the same model in the format's 32-bit form, for the size ratio.
        seconds: time to produce this file from the shared conversion (quantization, or the conversion itself).
        parity: :class:`~edgedistill.export.parity.ParityReport` as a dict.
        source: what the model was exported from (:meth:`ExportSource.describe`).
        details: format-specific facts (the GGUF pre-tokenizer choice, ONNX opset, how parity ran, tool versions).
        passed: derived: whether parity passed.
        size_ratio_to_f32: derived: ``bytes / f32_bytes``.
    """

    path: str
    bytes: int
    sha256: str
    format: str
    quantization: str
    parameters: int
    f32_bytes: int
    seconds: float
    parity: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    passed: bool = field(init=False)
    size_ratio_to_f32: float = field(init=False)
    edgedistill_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def __post_init__(self) -> None:
        self.passed = bool(self.parity.get("passed"))
        self.size_ratio_to_f32 = self.bytes / self.f32_bytes if self.f32_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StagedArtifact:
    """A finished, checked artifact still under its temporary name; :meth:`publish` renames it into place.

    Exporters stage every artifact and the caller publishes them together with the manifest
    (:func:`publish_with_manifest`), so that an export interrupted at any step leaves no new file under a final name.
    """

    tmp: Path
    final: Path
    record: ArtifactRecord

    def discard(self) -> None:
        remove_path(self.tmp)


def tool_versions(*distributions: str) -> dict[str, str | None]:
    """Installed versions of the libraries an artifact was made and checked with."""
    versions: dict[str, str | None] = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest in ``out``, or an empty one."""
    path = out / MANIFEST
    if not path.is_file():
        return {"schema": MANIFEST_SCHEMA, "artifacts": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EdgeDistillError(f"--out: {path} exists but is not a readable manifest ({err}); move it away") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise EdgeDistillError(f"--out: {path} exists but is not an edgedistill manifest; move it away")
    return manifest


def merged_manifest(out: Path, records: list[ArtifactRecord]) -> str:
    """The text of ``out/manifest.json`` with ``records`` merged in (a record replaces one with the same path)."""
    manifest = read_manifest(out)
    new_paths = {record.path for record in records}
    kept = [a for a in manifest["artifacts"] if a.get("path") not in new_paths and (out / a.get("path", "")).exists()]
    manifest["schema"] = MANIFEST_SCHEMA
    manifest["edgedistill_version"] = __version__
    manifest["artifacts"] = kept + [record.to_dict() for record in records]
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def publish_with_manifest(out: Path, staged: list[StagedArtifact]) -> Path:
    """Rename every staged artifact into place and merge its record into the manifest, as one step."""
    text = merged_manifest(out, [artifact.record for artifact in staged])
    publish_together(out, [(artifact.tmp, artifact.final) for artifact in staged], {MANIFEST: text})
    return out / MANIFEST
