"""The model an export starts from: a Hugging Face checkpoint directory, a ``.gguf`` file or a named teacher.

Whatever the form, the exporters get one thing: a float32 ``LlamaForCausalLM`` in eval mode, its Hugging Face
tokenizer, and a checkpoint directory holding both (a temporary one when the source is a GGUF, which transformers
dequantizes). Inputs are checked here, before anything heavy loads, so that bad input fails in one line.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.deps import require
from edgedistill.distill.teacher import NAMED_TEACHERS, TeacherSource, named_teacher_path
from edgedistill.distill.train import SUMMARY as TRAIN_SUMMARY
from edgedistill.errors import EdgeDistillError
from edgedistill.gguf_header import read_gguf_metadata

# What we can export: the Llama architecture in the forms transformers and gguf-py name it.
EXPORTABLE_MODEL_TYPES = ("llama",)
EXPORTABLE_ARCHITECTURES = ("LlamaForCausalLM",)
EXPORTABLE_GGUF_ARCHITECTURES = ("llama",)


@dataclass
class ExportSource:
    """A checked export input and the descriptive metadata that travels into the artifacts.

    Attributes:
        spec: what the user passed as MODEL_DIR.
        kind: ``"hf"`` (checkpoint directory) or ``"gguf"`` (a file, possibly a named teacher's).
        path: the directory or file.
        name: a short model name for file names and ``general.name``.
        license: the licence identifier when the source states one.
        base_model: what the model came from (the teacher of a distilled student, or the source file).
        sha256: digest of the source's weight file(s), filled in when the model loads.
    """

    spec: str
    kind: str
    path: Path
    name: str
    license: str | None = None
    base_model: str | None = None
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the source."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "path": str(self.path),
            "name": self.name,
            "license": self.license,
            "base_model": self.base_model,
            "sha256": self.sha256,
        }

    def teacher_source(self) -> TeacherSource:
        return TeacherSource(self.spec, self.kind, self.path)


def resolve_source(spec: str) -> ExportSource:
    """Check MODEL_DIR and describe it, without loading weights.

    Raises:
        EdgeDistillError: the path does not exist, is not a checkpoint or GGUF, or holds an architecture we
            cannot export.
    """
    if spec in NAMED_TEACHERS:
        return _gguf_source(spec, named_teacher_path(spec), name=spec)
    path = Path(spec)
    if path.is_dir():
        return _hf_source(spec, path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(spec, path, name=path.stem)
    if not path.exists():
        raise EdgeDistillError(
            f"model: {spec}: no such file or directory (expected a Hugging Face checkpoint "
            f"directory, a .gguf file or one of: {', '.join(NAMED_TEACHERS)})"
        )
    raise EdgeDistillError(f"model: {spec}: expected a Hugging Face checkpoint directory or a .gguf file")


def _hf_source(spec: str, path: Path) -> ExportSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgeDistillError(f"model: {path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EdgeDistillError(f"model: {config_path} cannot be read as JSON ({err})") from None
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in EXPORTABLE_MODEL_TYPES or not set(architectures) & set(EXPORTABLE_ARCHITECTURES):
        raise EdgeDistillError(
            f"model: {config_path}: architecture {'/'.join(architectures) or '?'} (model_type {model_type!r}) "
            f"cannot be exported; supported: {', '.join(EXPORTABLE_ARCHITECTURES)}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise EdgeDistillError(f"model: {path} has a config.json but no weights (*.safetensors or *.bin)")
    source = ExportSource(spec, "hf", path, name=clean_name(path.resolve().name))
    source.license = _model_card_license(path / "README.md")
    summary_path = path / TRAIN_SUMMARY
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            source.base_model = summary.get("teacher", {}).get("name")
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    return source


def _gguf_source(spec: str, path: Path, name: str) -> ExportSource:
    general = read_gguf_metadata(path, "general.")  # also refuses a file that is not well-formed GGUF
    architecture = general.get("general.architecture")
    if architecture not in EXPORTABLE_GGUF_ARCHITECTURES:
        raise EdgeDistillError(
            f"model: {path}: GGUF architecture {architecture!r} cannot be exported; "
            f"supported: {', '.join(EXPORTABLE_GGUF_ARCHITECTURES)}"
        )
    return ExportSource(
        spec,
        "gguf",
        path,
        name=clean_name(name),
        license=general.get("general.license"),
        base_model=general.get("general.name") or path.name,
    )


def clean_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "model"


def _model_card_license(readme: Path) -> str | None:
    """The ``license:`` field of a Hugging Face model card's YAML header, if there is one."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    match = re.search(r"^license:\s*(\S+)\s*$", header, flags=re.MULTILINE)
    return match.group(1).strip("'\"") if match else None


@dataclass
class LoadedModel:
    """The float32 model, its tokenizer, and a checkpoint directory that holds both."""

    model: Any
    tokenizer: Any
    checkpoint: Path
    parameters: int
    _tempdir: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None


def load_source(source: ExportSource) -> LoadedModel:
    """Load the model in float32 and its tokenizer; for a GGUF also write them to a temporary checkpoint.

    A GGUF goes through :mod:`edgedistill.distill.teacher`, whose tokenizer is built from the file's own
    vocabulary (no BOS prepended, EOS ``<|im_end|>`` for SmolLM2) rather than transformers' conversion.
    """
    from edgedistill.distill.teacher import load_model, load_tokenizer

    if source.kind == "gguf":
        tokenizer = load_tokenizer(source.teacher_source())
        model = load_model(source.teacher_source())
    else:
        tokenizer, model = _load_checkpoint(source.path)
    if getattr(model.config, "model_type", None) not in EXPORTABLE_MODEL_TYPES:
        raise EdgeDistillError(f"model: {source.path}: loaded as {type(model).__name__}, which cannot be exported")
    parameters = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    source.sha256 = source.teacher_source().fingerprint()
    if source.kind == "hf":
        return LoadedModel(model, tokenizer, source.path, parameters)
    tempdir = tempfile.TemporaryDirectory(prefix="edgedistill-export-")
    try:
        checkpoint = Path(tempdir.name)
        model.save_pretrained(checkpoint, safe_serialization=True)
        tokenizer.save_pretrained(checkpoint)
    except BaseException:
        tempdir.cleanup()
        raise
    return LoadedModel(model, tokenizer, checkpoint, parameters, tempdir)


def _load_checkpoint(path: Path) -> tuple[Any, Any]:
    torch = require("torch")
    require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise EdgeDistillError(f"model: {path}: cannot load the tokenizer ({type(err).__name__}: {err})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as err:
        raise EdgeDistillError(f"model: {path}: cannot load the weights ({type(err).__name__}: {err})") from None
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model
