"""The runtime is torch-free: importing it imports no heavy library, loading and generating from both formats imports
neither torch nor transformers, and an installation with only the runtime's dependencies generates."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runtime_helpers import REPO, tiny_exports

HEAVY = ("torch", "transformers", "onnxruntime", "llama_cpp", "onnx", "optimum")
# What `pip install edgedistill[runtime]` brings: the core dependencies and the runtime extra (pyproject.toml).
RUNTIME_DISTRIBUTIONS = ("numpy", "tqdm", "psutil", "tokenizers", "gguf", "jinja2", "onnxruntime", "onnx")
LLAMA_CPP_DISTRIBUTION = "llama-cpp-python"


def _python(code: str, *args: str, env: dict | None = None, flags: tuple[str, ...] = (), cwd: Path = REPO) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_pulls_in_no_heavy_library():
    loaded = _python(
        """
        import json, sys
        import edgedistill.runtime
        import edgedistill.runtime.cli, edgedistill.runtime.server, edgedistill.runtime.sampling
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))))
        """,
        ",".join(HEAVY),
    )
    assert loaded == []


def test_generation_from_both_formats_imports_neither_torch_nor_transformers():
    exports = tiny_exports()
    result = _python(
        """
        import json, sys
        from edgedistill.runtime import load
        texts = []
        for path in sys.argv[1:]:
            with load(path, threads=1) as model:
                texts.append(model.generate("The quick brown fox", max_tokens=8))
                texts.append(model.chat([{"role": "user", "content": "hi"}], max_tokens=4))
        print(json.dumps({"texts": texts, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                          ("torch", "transformers"))}))
        """,
        str(exports.onnx_dir),
        str(exports.gguf),
    )
    assert result["modules"] == []
    assert len(result["texts"]) == 4 and result["texts"][0] == result["texts"][2]


def _closure(names: tuple[str, ...]) -> set[str]:
    """Distributions ``names`` need, recursively (extras left out)."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = re.split(r"[\s<>=!~;\[(]", pending.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        pending.extend(r for r in requires if "extra ==" not in r)
    return seen


def _top_level(distribution: str) -> set[str]:
    """Top-level entries a distribution installs in site-packages (package folders, module files)."""
    files = importlib.metadata.files(distribution) or []
    names = set()
    for file in files:
        first = file.parts[0]
        if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__", "bin"):
            continue
        if len(file.parts) == 1 and not first.endswith((".py", ".so", ".pth")):
            continue
        names.add(first)
    return names


@pytest.mark.slow
def test_an_install_with_only_the_runtime_dependencies_generates(tmp_path):
    """pip installs the package (no dependencies) into a fresh target directory; beside it, links to exactly the
    runtime's dependency closure. With site-packages switched off, torch and transformers cannot be imported at
    all, and generation from both formats works."""
    pytest.importorskip("llama_cpp")
    exports = tiny_exports()
    site = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            REPO,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    distributions = _closure((*RUNTIME_DISTRIBUTIONS, LLAMA_CPP_DISTRIBUTION))
    assert not {"torch", "transformers"} & distributions
    site_packages = Path(importlib.metadata.distribution("numpy").locate_file(""))
    for distribution in distributions:
        for name in _top_level(distribution):
            source = site_packages / name
            if source.exists() and not (site / name).exists():
                (site / name).symlink_to(source)
    result = _python(
        """
        import importlib.util, json, sys
        from edgedistill.runtime import load
        found = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is not None]
        texts = [load(path, threads=1).generate("The quick brown fox", max_tokens=6) for path in sys.argv[1:]]
        print(json.dumps({"found": found, "texts": texts, "where": sys.modules["edgedistill"].__file__}))
        """,
        str(exports.onnx_dir),
        str(exports.gguf),
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        flags=("-S", "-s"),
        cwd=tmp_path,  # not the repository, whose edgedistill/ folder would shadow the installed package
    )
    assert result["found"] == []
    assert result["texts"][0] == result["texts"][1] and result["texts"][0]
    assert result["where"].startswith(str(site))
