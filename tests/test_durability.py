"""Writes survive kills: atomic and fsynced files with the umask's permissions, a directory claim that sweeps a dead
run's temporaries and finishes its publish, and an export killed with SIGKILL at several points that a rerun
leaves clean (no temporary files, every artifact with its manifest entry)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from export_helpers import save_checkpoint

from edgedistill.errors import EdgeDistillError
from edgedistill.files import (
    JOURNAL_NAME,
    LOCK_NAME,
    atomic_write_text,
    claim,
    is_temp_name,
    publish,
    publish_together,
    temp_path,
)

REPO = Path(__file__).resolve().parents[1]


def _umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no Umask line in /proc/self/status")


def test_atomic_write_gives_plain_open_permissions_and_leaves_nothing(tmp_path):
    before = _umask()
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert _umask() == before  # never changed, not even for a moment we could see
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~before
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temp_names_are_recognised():
    name = temp_path(Path("/x"), "model-q8_0.gguf").name
    assert is_temp_name(name) and name.startswith(".model-q8_0.gguf.")
    assert is_temp_name(".teacher-f32.gguf.k3j_x9a2.tmp")  # tempfile.mkstemp's names (what older runs left)
    assert not is_temp_name("model.tmp") and not is_temp_name(".hidden") and not is_temp_name("manifest.json")


def test_publish_replaces_a_directory_whole(tmp_path):
    final = tmp_path / "model-onnx"
    final.mkdir()
    (final / "old.onnx").write_text("old")
    tmp = temp_path(tmp_path, final.name)
    tmp.mkdir()
    (tmp / "model.onnx").write_text("new")
    publish(tmp, final)
    assert [p.name for p in final.iterdir()] == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["model-onnx"]


def test_claim_sweeps_a_dead_runs_temporaries_and_keeps_everything_else(tmp_path):
    (tmp_path / ".teacher-f32.gguf.k3j_x9a2.tmp").write_text("half")
    (tmp_path / temp_path(tmp_path, "onnx").name).mkdir()
    (tmp_path / "keep.gguf").write_text("model")
    (tmp_path / ".gitignore").write_text("*")
    with claim(tmp_path) as directory:
        assert sorted(p.name for p in directory.iterdir()) == sorted([".gitignore", LOCK_NAME, "keep.gguf"])
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_live_run_on_the_directory_is_refused(tmp_path):
    with claim(tmp_path):
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from edgedistill.files import claim\n"
             "from edgedistill.errors import EdgeDistillError\n"
             "try:\n    claim(sys.argv[1]).__enter__()\nexcept EdgeDistillError as e:\n    print(e); sys.exit(2)",
             str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert child.returncode == 2
        assert f"in use by another edgedistill run (process {os.getpid()})" in child.stdout


def test_claim_of_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(EdgeDistillError, match="exists and is not a directory"):
        with claim(tmp_path / "f"):
            pass


def test_an_interrupted_publish_is_finished_by_the_next_claim(tmp_path):
    """The journal was written and the first rename done, then the process died: the next claim completes it."""
    first, second = temp_path(tmp_path, "a.gguf"), temp_path(tmp_path, "b.gguf")
    first.write_text("A")
    second.write_text("B")
    journal = {"moves": [[first.name, "a.gguf"], [second.name, "b.gguf"]], "files": {"manifest.json": "[1]\n"}}
    (tmp_path / JOURNAL_NAME).write_text(json.dumps(journal))
    os.replace(first, tmp_path / "a.gguf")
    with claim(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "manifest.json"]
    assert (tmp_path / "b.gguf").read_text() == "B" and (tmp_path / "manifest.json").read_text() == "[1]\n"


def test_publish_together(tmp_path):
    tmp = temp_path(tmp_path, "m.gguf")
    tmp.write_text("M")
    publish_together(tmp_path, [(tmp, tmp_path / "m.gguf")], {"manifest.json": "{}\n"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "manifest.json"]


# ------------------------------------------------------------------------------------------------ kill -9 export

pytest.importorskip("llama_cpp")

EXPORT = "import sys\nfrom edgedistill.cli import main\nsys.exit(main(sys.argv[1:]))"


def _start_export(checkpoint: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EXPORT, "export", "gguf", str(checkpoint), "--quant", "f32,q8_0,q4_k_m",
         "--out", str(out), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def _assert_consistent(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporaries, no journal, no lock
    manifest = json.loads((out / "manifest.json").read_text())
    records = {a["path"]: a for a in manifest["artifacts"]}
    models = sorted(n for n in names if n.endswith(".gguf"))
    assert models == sorted(records)  # every artifact has its entry and every entry its artifact
    for name in models:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == records[name]["sha256"]


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory):
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    out = tmp_path_factory.mktemp("first")
    first = _start_export(checkpoint, out)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    return checkpoint, out


@pytest.mark.parametrize("lines_before_kill", [1, 3, 5])
def test_export_killed_at_any_point_then_rerun_is_clean(exported_once, tmp_path, lines_before_kill):
    """SIGKILL after the export printed N progress lines (loading, pre-tokenizer, each artifact's parity), with
    an earlier export's files in the directory; the rerun sweeps and finishes, and leaves a consistent state."""
    checkpoint, first = exported_once
    out = tmp_path / "out"
    shutil.copytree(first, out)
    victim = _start_export(checkpoint, out)
    seen = 0
    deadline = time.monotonic() + 300
    while seen < lines_before_kill and time.monotonic() < deadline:
        if not victim.stderr.readline():
            break
        seen += 1
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    rerun = _start_export(checkpoint, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    _assert_consistent(out)
