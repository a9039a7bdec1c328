"""The run directory's files: the resumable training checkpoint, ``metrics.jsonl``, the final checkpoint.

``checkpoint.pt`` is written atomically and read back weights-only (a checkpoint is data, never code) and checked
against the run that resumes from it; the rows of ``metrics.jsonl`` are cut back to the checkpoint's step; the
Hugging Face checkpoint lands file by file, weights last. Only rank 0 calls these.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.distill.config import TrainConfig
from edgedistill.errors import EdgeDistillError
from edgedistill.files import make_temp_dir, publish, temp_path

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
# Settings a resumed run may change; anything else would make the resumed run a different run.
RESUMABLE_CHANGES = {"resume", "log_every", "save_every", "threads", "device", "eval_tokens", "eval_data", "out"}


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    config: TrainConfig,
    data_sha256: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """``OUT/checkpoint.pt`` after ``step``: weights, optimizer and schedule state, the run's settings and data hash,
    and ``extra`` entries of training state that are not the model's (feature distillation's projections), written
    to a temporary file and renamed into place."""
    import torch

    # Only tensors and plain data (dicts, lists, numbers, strings): load_checkpoint reads it with weights_only.
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.to_dict(),
        "data_sha256": data_sha256,
        "version": __version__,
        **(extra or {}),
    }
    tmp = temp_path(out, CHECKPOINT)
    try:
        torch.save(state, tmp)
        publish(tmp, out / CHECKPOINT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(out: Path, config: TrainConfig, data_sha256: str) -> dict[str, Any] | None:
    """The state in ``OUT/checkpoint.pt`` (None when there is none), read weights-only and checked to belong to
    this run: same settings except :data:`RESUMABLE_CHANGES`, same data, a step within the run."""
    import torch

    path = out / CHECKPOINT
    if not path.is_file():
        return None  # nothing to resume: --resume starts the run, so that reruns of a script just continue
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run whatever code a planted file names
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch names a refused object so; anything else: a damaged file
            raise EdgeDistillError(
                f"resume: {path} cannot be read (not a checkpoint file); delete it to start the run over"
            ) from None
        raise EdgeDistillError(
            f"resume: {path} holds objects other than tensors and plain data, which are not loaded because "
            "unpickling them can run code; delete it to start the run over"
        ) from None
    except Exception as err:
        raise EdgeDistillError(
            f"resume: {path} cannot be read ({type(err).__name__}); delete it to start the run over"
        ) from None
    expected = {"step": int, "model": dict, "optimizer": dict, "scheduler": dict, "config": dict, "data_sha256": str}
    wrong = [k for k, kind in expected.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise EdgeDistillError(f"resume: {path} is not an edgedistill training checkpoint (no valid '{wrong[0]}')")
    if not 0 <= state["step"] <= config.steps:
        raise EdgeDistillError(f"resume: {path} is at step {state['step']}, outside this run's 0..{config.steps}")
    saved, current = state["config"], config.to_dict()
    defaults = TrainConfig().to_dict()  # a setting added after the checkpoint was written had its default then
    for name, value in current.items():
        if name not in RESUMABLE_CHANGES and saved.get(name, defaults[name]) != value:
            raise EdgeDistillError(
                f"resume: {name} is {value!r} but the checkpoint in {out} was trained with {saved.get(name)!r}"
            )
    if state["data_sha256"] != data_sha256:
        raise EdgeDistillError(f"resume: the data differ from those the checkpoint in {out} was trained on")
    return state


def save_final(out: Path, student: Any, tokenizer: Any, vocab_map: Any = None) -> None:
    """The Hugging Face checkpoint (config, safetensors, tokenizer, chat template; a trimmed student's
    ``vocab_map.json``), each file renamed into place."""
    staging = make_temp_dir(out, "final")
    try:
        student.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if vocab_map is not None:
            vocab_map.save(staging)
        else:  # an earlier trimmed run's map must not describe this full-vocabulary checkpoint
            (out / "vocab_map.json").unlink(missing_ok=True)
        files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors")  # weights land last
        for file in files:
            publish(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """The loss curves of ``metrics.jsonl`` as a PNG (nothing when it holds no rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (
        ("loss", "total"),
        ("ce", "CE"),
        ("kd", "KD"),
        ("feature", "feature"),
        ("attention", "attention"),
    ):
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            axes.plot(steps, values, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("edgedistill training loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tmp = temp_path(png_path.parent, png_path.name)
    figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    publish(tmp, png_path)


def metrics_through(path: Path, last_step: int) -> str:
    """The rows of ``metrics.jsonl`` up to ``last_step`` (those of the resumed checkpoint), as text.

    An unreadable last line is the torn end of a write that a kill interrupted: it is dropped with a note. Any
    other unreadable line means the file was damaged, and resuming would silently lose its history: an error."""
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file ends with a newline
    kept = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):
                print(f"resume: dropped the incomplete last line {number} of {path} (an interrupted write)")
                break
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0][:80]
            raise EdgeDistillError(
                f"{path}:{number}: not a metrics row ({reason}); repair or delete the file to resume"
            ) from None
        if row["step"] <= last_step:
            kept.append(raw.decode("utf-8") + "\n")
    return "".join(kept)


def prepare_out(out: Path, resume: bool) -> None:
    """Refuse to start over a finished or running run unless resuming (the claim made ``out`` and swept it)."""
    if not resume and ((out / CHECKPOINT).exists() or (out / SUMMARY).exists()):
        raise EdgeDistillError(f"out: {out} already holds a run; pass --resume to continue it or choose another --out")
