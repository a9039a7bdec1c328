"""The export recipe: what to export, to which format and quantizations, where. Imports without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgedistill.errors import EdgeDistillError
from edgedistill.export.gguf import DEFAULT_GGUF_QUANTS, GGUF_QUANTS
from edgedistill.export.onnx import DEFAULT_ONNX_QUANTS, ONNX_QUANTS

# format -> (quantization names, defaults)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gguf": (tuple(GGUF_QUANTS), DEFAULT_GGUF_QUANTS),
    "onnx": (tuple(ONNX_QUANTS), DEFAULT_ONNX_QUANTS),
}


@dataclass
class ExportRecipe:
    """One ``edgedistill export`` run.

    Attributes:
        format: ``"gguf"`` or ``"onnx"``.
        model: a Hugging Face checkpoint directory, a ``.gguf`` file or a named teacher.
        quants: quantization names of the format, in the order given (repeats dropped); empty means the defaults.
        out: output directory; receives the artifacts and ``manifest.json``.
        allow_mismatch: exit 0 even when an artifact fails parity (the manifest still says so).
        threads: CPU threads for PyTorch, llama.cpp and onnxruntime (0: every CPU this process may use).
        name: model name for file names and metadata (default: from the source).
        license: licence identifier written into the metadata (default: what the source states).
    """

    format: str
    model: str
    out: Path
    quants: list[str] = field(default_factory=list)
    allow_mismatch: bool = False
    threads: int = 0
    name: str | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise EdgeDistillError(f"format: unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        known, defaults = FORMATS[self.format]
        quants = [q.strip().lower() for q in self.quants if q.strip()] or list(defaults)
        unknown = [q for q in quants if q not in known]
        if unknown:
            raise EdgeDistillError(
                f"--quant: unknown {self.format} quantization {unknown[0]!r}; choose from {', '.join(known)}"
            )
        self.quants = list(dict.fromkeys(quants))
        self.out = Path(self.out)
        if self.threads < 0:
            raise EdgeDistillError(f"--threads: must be 0 (all CPUs) or positive, got {self.threads}")
        if self.name is not None and not self.name.strip():
            raise EdgeDistillError("--name: must not be empty")

    @staticmethod
    def parse_quants(text: str | None) -> list[str]:
        """``"f16,q8_0"`` -> ``["f16", "q8_0"]``."""
        return [part for part in (text or "").split(",") if part.strip()]
