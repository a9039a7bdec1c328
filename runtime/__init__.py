"""Stage 3: the torch-free runtime that loads an exported student. It imports nothing from the other stages.

``load(path)`` picks the backend from the file: a ``.gguf`` file runs in llama.cpp (llama-cpp-python), an ``.onnx``
file or an ONNX export directory (holding ``model.onnx``) in onnxruntime. Both return a
:class:`~edgedistill.runtime.model.LanguageModel`::

    from edgedistill.runtime import load

    model = load("student-q8_0.gguf", threads=4)
    print(model.generate("The capital of France is", max_tokens=16))
    for piece in model.stream("Once upon a time", temperature=0.8, top_p=0.95, seed=0):
        print(piece, end="", flush=True)
    print(model.chat([{"role": "user", "content": "Hi!"}]))
    print(model.info)

    # Speculative decoding: a distilled student drafts, the teacher verifies (same greedy output, faster).
    teacher = load("teacher-q8_0.gguf", draft="student-q8_0.gguf", threads=2)

Importing this package imports neither torch nor transformers, and onnxruntime or llama_cpp only inside ``load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgedistill.errors import EdgeDistillError

if TYPE_CHECKING:
    from edgedistill.runtime.model import LanguageModel

__all__ = ["load", "detect_format"]

GGUF_MAGIC = b"GGUF"


def detect_format(path: str | Path) -> str:
    """``gguf`` or ``onnx`` for a model path, by its suffix, its directory contents, or its first bytes.

    Raises:
        EdgeDistillError: the path does not exist or is neither format.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return "onnx"
        raise EdgeDistillError(f"{path}: a directory must hold an ONNX export (model.onnx); none found")
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such model file or directory")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".onnx":
        return "onnx"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot be read ({err.strerror})") from None
    if head == GGUF_MAGIC:
        return "gguf"
    raise EdgeDistillError(f"{path}: not a model this runtime loads (expected a .gguf or .onnx file, or a directory)")


def load(
    path: str | Path,
    threads: int | None = None,
    context: int | None = None,
    draft: str | Path | None = None,
    draft_tokens: int | None = None,
) -> LanguageModel:
    """Load an exported model for generation.

    Args:
        path: a ``.gguf`` file, a ``.onnx`` file, or an ONNX export directory holding ``model.onnx``.
        threads: CPU threads (None: every CPU this process may use).
        context: tokens of prompt plus output the model can hold (None: the model's maximum, at most 2048).
        draft: a smaller model of the same vocabulary (or a trimmed subset of it), in either format: generation
            then decodes speculatively (:mod:`edgedistill.runtime.speculative`), with the same output as the model
            alone when greedy and the same distribution when sampling.
        draft_tokens: tokens the draft proposes per round (1-16; None: adapted to the acceptance).

    Returns:
        The model, with ``generate``, ``stream``, ``chat``, ``tokenize``, ``detokenize``, ``logits`` and ``info``.

    Raises:
        EdgeDistillError: a missing, corrupt or truncated file, bad arguments, the backend's package missing, or a
            draft whose vocabulary does not map onto the model's.
    """
    if draft is None:
        if draft_tokens is not None:
            raise EdgeDistillError("draft_tokens: applies only with a draft model")
        return _load_one(path, threads, context)
    from edgedistill.runtime.speculative import SpeculativeModel, check_draft_tokens

    check_draft_tokens(draft_tokens)
    teacher = _load_one(path, threads, context)
    try:
        draft_model = _load_one(draft, threads, None)
    except BaseException:
        teacher.close()
        raise
    try:
        return SpeculativeModel(teacher, draft_model, draft_tokens)
    except BaseException:
        teacher.close()
        draft_model.close()
        raise


def _load_one(path: str | Path, threads: int | None, context: int | None) -> LanguageModel:
    kind = detect_format(path)
    if kind == "gguf":
        from edgedistill.runtime.gguf_backend import GgufModel

        return GgufModel(Path(path), threads=threads, context=context)
    from edgedistill.runtime.onnx_backend import OnnxModel

    return OnnxModel(Path(path), threads=threads, context=context)
