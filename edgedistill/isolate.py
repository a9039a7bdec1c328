"""Run native code where its crash cannot take the command down: a fresh interpreter per call.

A segmentation fault or an abort inside llama.cpp or onnxruntime kills the process it runs in; Python cannot catch
it. :func:`run_isolated` runs a function in a child interpreter (``python -m edgedistill.isolate``) and turns the
child's death into an :class:`~edgedistill.errors.EdgeDistillError` that names what was being run and the signal.

The child is a plain ``subprocess`` rather than ``multiprocessing``: ``spawn`` re-imports the caller's main module,
which re-runs a user's script that lacks an ``if __name__ == "__main__"`` guard, and ``fork`` after torch has
started its OpenMP threads can deadlock the child. The function is named by module and qualified name, its
arguments and result travel as pickles through a private temporary directory, and the child's stderr is kept so
that the last thing it printed can be quoted.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgedistill.errors import EdgeDistillError

T = TypeVar("T")


def describe_exit(code: int | None) -> str:
    """``'killed by SIGSEGV'`` for a negative return code, ``'exit 3'`` otherwise."""
    if code is None:
        return "did not finish"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code in (128 + signal.SIGSEGV, 128 + signal.SIGABRT):  # a shell between us reports signals this way
        return f"exit {code} ({signal.Signals(code - 128).name})"
    return f"exit {code}"


def run_isolated(function: Callable[..., T], *args: Any, what: str, timeout_s: float | None = None) -> T:
    """``function(*args)`` computed in a child interpreter; its exception re-raised here, its crash reported.

    Args:
        function: a module-level function (it is imported by name in the child).
        args: picklable arguments.
        what: names the work in an error, e.g. ``"parity check of out/model-q8_0.gguf"``.
        timeout_s: kill the child after this long.

    Raises:
        EdgeDistillError: the child died (a signal, a non-zero exit without a result) or ran out of time, in one
            line with ``what`` and the last line it printed; or whatever ``function`` raised.
    """
    with tempfile.TemporaryDirectory(prefix="edgedistill-isolated-") as scratch:
        job, result, stderr_path = Path(scratch, "job.pkl"), Path(scratch, "result.pkl"), Path(scratch, "stderr")
        job.write_bytes(pickle.dumps((function.__module__, function.__qualname__, args)))
        with open(stderr_path, "wb") as stderr:
            try:
                process = subprocess.run(
                    [sys.executable, "-m", "edgedistill.isolate", str(job), str(result)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    timeout=timeout_s,
                    env={**os.environ, "PYTHONFAULTHANDLER": ""},
                )
            except subprocess.TimeoutExpired:
                raise EdgeDistillError(f"{what}: did not finish within {timeout_s:g} s") from None
        if result.is_file():
            ok, value = pickle.loads(result.read_bytes())
            if ok:
                return value
            raise value
        lines = [line for line in stderr_path.read_text("utf-8", errors="replace").splitlines() if line.strip()]
        last = f"; it printed: {lines[-1].strip()[:200]}" if lines else ""
        raise EdgeDistillError(f"{what}: the native library crashed ({describe_exit(process.returncode)}){last}")


def _child(job: Path, result: Path) -> None:
    module, qualname, args = pickle.loads(job.read_bytes())
    function: Any = importlib.import_module(module)
    for part in qualname.split("."):
        function = getattr(function, part)
    try:
        outcome = (True, function(*args))
    except Exception as err:  # sent to the parent, which raises it
        try:
            pickle.dumps(err)
            outcome = (False, err)
        except Exception:
            outcome = (False, RuntimeError(f"{type(err).__name__}: {err}"))
    tmp = result.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(outcome))
    os.replace(tmp, result)  # the parent sees a whole result or none


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
