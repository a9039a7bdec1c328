"""Build the embedded default corpus, ``default.jsonl.gz`` (maintainer script; the result is committed).

Usage: ``python distill/corpus/build.py`` with CPython 3.11.7 — the version the committed file was made with.

The corpus is English prose written by people and released under the PSF License Agreement (LICENSE-PSF.txt):
the Python Language Reference topics that CPython ships as ``pydoc_data.topics``, and the docstrings of the
public standard-library modules, their public classes, methods and functions. Nothing is downloaded; every run
on the same CPython gives the same bytes. See README.md beside this file.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import io
import json
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
# Modules that do something when imported (open a browser, print, start a GUI) or are not prose documentation.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "test",
    "pydoc_data",
    "xxlimited",
    "xxsubtype",
    "xxlimited_35",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "nt",
    "_winapi",
    "encodings",
}
MIN_CHARS = 120  # shorter docstrings are mostly signatures ("Return self+value.")


def _docstrings(module) -> list[str]:
    parts = []
    seen = set()

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= MIN_CHARS and doc not in seen:
            seen.add(doc)
            parts.append(doc)

    add(module)
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    add(getattr(obj, attr, None))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(obj)
    return parts


def documents() -> list[dict[str, str]]:
    import pydoc_data.topics

    docs = [{"text": text.strip()} for _, text in sorted(pydoc_data.topics.topics.items())]
    for name in _stdlib_modules():
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules
            continue
        parts = _docstrings(module)
        if parts:
            docs.append({"text": "\n\n".join(parts)})
    return docs


def _stdlib_modules() -> list[str]:
    """Public standard-library modules and the public submodules of its packages, sorted."""
    names = set()
    for name in sys.stdlib_module_names:
        if name.startswith("_") or name in SKIP:
            continue
        names.add(name)
        try:
            package = importlib.import_module(name)
        except Exception:
            continue
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{name}."):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts[1:]):
                continue
            names.add(info.name)
    return sorted(names)


def main() -> None:
    buffer = io.BytesIO()
    # mtime=0 keeps the gzip bytes identical from run to run.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as handle:
        for doc in documents():
            handle.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    (HERE / "default.jsonl.gz").write_bytes(buffer.getvalue())
    print(f"wrote {HERE / 'default.jsonl.gz'} ({len(buffer.getvalue())} bytes)")


if __name__ == "__main__":
    main()
