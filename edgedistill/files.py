"""Durable, atomic file writes for every stage, and a claim on a directory that cleans up after a dead run.

Rules every writer follows:

- A file or directory is written under a temporary name next to its final one (:func:`temp_path`:
  ``.NAME.XXXXXXXX.tmp``), flushed to disk (``fsync``), renamed onto the final name, and the directory entry is
  flushed too: after a crash or a power cut the final name holds the old content or the new, never a torn file.
- Temporary files are created with mode ``0o666`` and directories with ``0o777``, so the process umask gives them
  the permissions a plain ``open`` would, without ever changing the umask (a process-wide setting that other
  threads would see).
- A command that writes into a directory first :func:`claim` s it: an exclusive ``flock`` on
  ``DIR/.edgedistill.lock`` (which the kernel releases when the process dies, kill -9 included), then any
  interrupted :func:`publish_together` is completed and every temporary name left in ``DIR`` is removed, since
  no live run can own it. A second run on the same directory meanwhile gets a one-line error.
- Files that must appear together (artifacts and the manifest that describes them) are published through a
  journal (:func:`publish_together`), rolled forward by the next claim if the process dies half-way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from edgedistill.errors import EdgeDistillError

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".edgedistill.lock"
JOURNAL_NAME = ".edgedistill-publish.json"
# .NAME.XXXXXXXX.tmp: ours (token_hex) and tempfile.mkstemp's (8 characters of [a-z0-9_]) alike
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def temp_path(directory: Path, final_name: str) -> Path:
    """A fresh hidden temporary name for ``final_name`` in ``directory`` (nothing is created)."""
    return Path(directory) / f".{final_name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`temp_path`'s names (what :func:`sweep_temps` removes)."""
    return bool(_TEMP_NAME.match(name))


def _fsync_fd(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file in a directory tree and the directories themselves, to disk."""
    path = Path(path)
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_fd(Path(root, name), os.O_RDONLY)
            _fsync_fd(Path(root), os.O_RDONLY | os.O_DIRECTORY)
    else:
        _fsync_fd(path, os.O_RDONLY)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    _fsync_fd(Path(directory), os.O_RDONLY | os.O_DIRECTORY)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or directory onto its final name, durably.

    A directory cannot be renamed over a non-empty one, so an older ``final`` directory is first moved aside
    (under a temporary name, deleted afterwards): there is a short moment without ``final``, never one in which it
    holds a half-written tree.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if tmp.is_dir() and final.is_dir():
        old = temp_path(final.parent, final.name + ".old")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        remove_path(old)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: on a clean exit it is fsynced and renamed onto ``path``; on an
    exception it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path.parent, path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, an fsync and a rename: never a half-written file."""
    with atomic_open(path) as out:
        out.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(directory: Path, final_name: str) -> Path:
    """Create a temporary directory for ``final_name`` in ``directory`` (mode 0o777 less the umask)."""
    path = temp_path(directory, final_name)
    path.mkdir(mode=0o777)
    return path


# -------------------------------------------------------------------------------------------- publish together


def publish_together(directory: Path, moves: Sequence[tuple[Path, Path]], files: dict[str, str]) -> None:
    """Publish several temporary paths and write several small text files as one step that a kill cannot split.

    A journal listing every rename and every file's text is written first (atomically); then the renames and
    writes are done and the journal removed. If the process dies in between, the next :func:`claim` of
    ``directory`` finds the journal and finishes the job, so an artifact never stays without its manifest entry.

    Args:
        directory: where the journal lives (every path is inside it).
        moves: ``(temporary, final)`` pairs, each published with :func:`publish`.
        files: final file name (relative to ``directory``) -> text, written after the moves.
    """
    directory = Path(directory)
    for tmp, _ in moves:
        fsync_tree(Path(tmp))
    journal = {
        "moves": [[os.path.relpath(tmp, directory), os.path.relpath(final, directory)] for tmp, final in moves],
        "files": files,
    }
    atomic_write_text(directory / JOURNAL_NAME, json.dumps(journal))
    _roll_forward(directory)


def _roll_forward(directory: Path) -> bool:
    """Complete the journal in ``directory`` if there is one; returns whether there was."""
    path = directory / JOURNAL_NAME
    if not path.is_file():
        return False
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        moves, files = journal["moves"], journal["files"]
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # a journal is written atomically: an unreadable one is not ours to finish
        return False
    for tmp, final in moves:
        if (directory / tmp).exists():  # done already when a previous roll-forward got this far
            publish(directory / tmp, directory / final)
    for name, text in files.items():
        atomic_write_text(directory / name, text)
    path.unlink()
    fsync_dir(directory)
    return True


# ------------------------------------------------------------------------------------------------------- claim


def sweep_temps(directory: Path) -> list[str]:
    """Remove every temporary name (:func:`is_temp_name`) in ``directory``; returns the names removed.

    Only safe while holding :func:`claim` on the directory: a live run's temporaries would go too.
    """
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        if is_temp_name(entry.name):
            remove_path(entry)
            removed.append(entry.name)
    return removed


@contextlib.contextmanager
def claim(directory: Path, what: str = "--out") -> Iterator[Path]:
    """Hold ``directory`` for one run: lock it, finish an interrupted publish, sweep a dead run's temporaries.

    Args:
        directory: created if missing.
        what: names the directory in errors (the flag it came from).

    Raises:
        EdgeDistillError: the path is not a writable directory, or another live run holds it.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EdgeDistillError(f"{what}: {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise EdgeDistillError(f"{what}: {directory} is not writable ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "?"
            raise EdgeDistillError(
                f"{what}: {directory} is in use by another edgedistill run (process {holder}); wait for it to end"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _roll_forward(directory)
        sweep_temps(directory)
        try:
            yield directory
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
    finally:
        os.close(fd)


def sha256_file(*paths: Path) -> str:
    """sha256 of the files' bytes, read in 4 MiB blocks (several files: one digest over them in order)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
