"""The export recipe: what to export, to which format and quantizations, where. Imports without torch.

:class:`ExportRecipe` is a :class:`~edgedistill.config.FlagConfig`: each setting is declared once, and that gives
its ``--flag``, its help text and its key in a ``--config`` TOML or JSON file, as for ``edgedistill distill``. What
to export (``FORMAT MODEL_DIR``) is given on the command line only; a file holds the settings of a recipe that can
be reused across models (``quant = ["q8_0", "q4_k_m"]``, ``threads = 4``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.config import FlagConfig, naming_file, setting
from edgedistill.errors import EdgeDistillError
from edgedistill.export.formats import ExportFormat, FormatRegistry
from edgedistill.export.registry import FORMATS

# Fields given as positional arguments (FORMAT MODEL_DIR) rather than flags or config-file keys.
POSITIONAL = ("format", "model")


@dataclass
class ExportSettings(FlagConfig):
    """How to export: every field is a flag (``--field-name``) and a key of ``--config FILE``.

    Attributes:
        out: output directory; receives the artifacts and ``manifest.json``.
        quant: quantization names of the format, comma-separated or as a list, in the order given (repeats
            dropped); empty means the format's defaults.
        allow_mismatch: exit 0 even when an artifact fails parity (the manifest still says so).
        threads: CPU threads for PyTorch, llama.cpp and onnxruntime (0: every CPU this process may use).
        name: model name for file names and metadata (None: from the source).
        license: licence identifier written into the metadata (None: what the source states).
        verbose: let llama.cpp, optimum and onnxruntime log.
    """

    out: str = setting("", "output directory (artifacts + manifest.json)", metavar="DIR")
    quant: list[str] = setting(
        factory=list, help=f"comma-separated quantizations. {FORMATS.quant_help()}", metavar="LIST"
    )
    allow_mismatch: bool = setting(
        False, "exit 0 even when an artifact fails parity (the manifest records the failure)"
    )
    threads: int = setting(0, "CPU threads (0: all this process may use)")
    # None (not ""): an explicitly empty --name is an error, not a request for the default.
    name: str = setting(None, "model name for file names and metadata; unset: the source's")
    license: str = setting(None, "licence id for the metadata; unset: the source's, if any")
    verbose: bool = setting(False, "let llama.cpp, optimum and onnxruntime log")

    def __post_init__(self) -> None:
        self.out = "" if self.out in (None, "") else str(Path(self.out))  # a caller may pass a Path
        if not self.out:
            raise EdgeDistillError("--out: expected an output directory (--out DIR, or out in --config)")
        raw = [self.quant] if isinstance(self.quant, str) else list(self.quant)
        quants = [q.strip().lower() for part in raw for q in str(part).split(",") if q.strip()]
        self.quant = list(dict.fromkeys(quants))
        if self.threads < 0:
            raise EdgeDistillError(f"--threads: must be 0 (all CPUs) or positive, got {self.threads}")
        if self.name is not None and not self.name.strip():
            raise EdgeDistillError("--name: must not be empty")


@dataclass(kw_only=True)
class ExportRecipe(ExportSettings):
    """One ``edgedistill export`` run: what to export (``FORMAT MODEL_DIR``) and :class:`ExportSettings`.

    Attributes:
        format: a name in the format registry (``"gguf"``, ``"onnx"``); checked by :meth:`select`, against
            the registry the export runs with.
        model: a Hugging Face checkpoint directory, a ``.gguf`` file or a named teacher.
    """

    format: str = setting(help="artifact format", metavar="FORMAT")
    model: str = setting(
        help="Hugging Face Llama checkpoint directory (e.g. what `edgedistill distill` wrote), a .gguf file, or "
        "smollm2-135m (the default teacher)",
        metavar="MODEL_DIR",
    )

    def select(self, formats: FormatRegistry = FORMATS) -> tuple[ExportFormat, list[str]]:
        """The format this recipe names and the quantizations to write (the format's defaults when none given).

        Raises:
            EdgeDistillError: an unknown format (``format: ...``) or quantization (``--quant: ...``).
        """
        return formats.select(self.format, self.quant)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    # ------------------------------------------------------------------------------------------- the CLI

    @classmethod
    def add_flags(
        cls,
        parser: argparse.ArgumentParser,
        help_texts: dict[str, str] | None = None,
        formats: FormatRegistry = FORMATS,
    ) -> None:
        """``FORMAT MODEL_DIR`` as positional arguments, then ``--config FILE`` and one flag per setting."""
        helps = {item.name: item.metadata["help"] for item in dataclasses.fields(cls)}
        parser.add_argument("format", choices=sorted(formats), help=helps["format"])
        parser.add_argument("model", metavar="MODEL_DIR", help=helps["model"])
        ExportSettings.add_flags(parser, help_texts)

    @classmethod
    def from_args(cls, args: argparse.Namespace, formats: FormatRegistry = FORMATS) -> ExportRecipe:
        """The recipe :meth:`add_flags`' parser read (defaults, then ``--config``, then flags), checked against
        ``formats``; an error in a value the config file set names the file."""
        overrides = {item.name: getattr(args, item.name, None) for item in dataclasses.fields(cls)}
        config_file = getattr(args, "config", None)
        recipe = cls.from_sources(config_file, overrides)
        with naming_file(config_file, [name for name, value in overrides.items() if value is None]):
            recipe.select(formats)
        return recipe

    @classmethod
    def file_settings(cls, config_file: str | None) -> dict[str, Any]:
        """:meth:`FlagConfig.file_settings`, refusing ``format`` and ``model``: the command line always gives
        them, so a file's value would be silently ignored."""
        settings = super().file_settings(config_file)
        for key in POSITIONAL:
            if key in settings:
                raise EdgeDistillError(
                    f"{config_file}: {key}: given on the command line (FORMAT MODEL_DIR), not in a config file"
                )
        return settings
