"""Availability checks for optional heavy dependencies, so that a missing extra says which install fixes it.

Part of the shared core: every stage imports it, ``runtime/`` included."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from edgedistill.errors import EdgeDistillError

# module name -> the pip command that provides it
_INSTALL_HINTS = {
    "torch": "pip install 'edgedistill[distill]' (on these machines first: pip install torch==2.13.0)",
    "transformers": "pip install 'edgedistill[distill]'",
    "safetensors": "pip install 'edgedistill[distill]'",
    "matplotlib": "pip install 'edgedistill[distill]'",
    "accelerate": "pip install 'edgedistill[distill]'",
    "llama_cpp": "pip install 'edgedistill[runtime]' (llama-cpp-python compiles llama.cpp: several minutes)",
    "optimum": "pip install 'edgedistill[export]'",
    "onnxruntime": "pip install 'edgedistill[runtime]' (or pip install onnxruntime)",
    "jinja2": "pip install 'edgedistill[runtime]' (or pip install jinja2)",
    "tokenizers": "pip install 'edgedistill[runtime]' (or pip install tokenizers)",
    "onnx": "pip install 'edgedistill[export]'",
    "onnx_ir": "pip install 'edgedistill[export]'",
    "gguf": "pip install gguf",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an :class:`EdgeDistillError` that names the install command."""
    if importlib.util.find_spec(module) is None:
        hint = _INSTALL_HINTS.get(module, f"pip install {module}")
        raise EdgeDistillError(f"this needs the Python package '{module}', which is not installed: {hint}")
    return importlib.import_module(module)
