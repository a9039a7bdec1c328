"""Training schedules (``--schedule FILE``): consecutive phases, each with its own steps and some of the run's
settings replaced.

The file is TOML, one ``[[phase]]`` table per phase::

    [[phase]]
    name = "lower-features"      # required, unique
    steps = 8                    # required, > 0
    feature_weight = 1.0
    feature_layers = "0,1,2"
    logit_weight = 0.0

    [[phase]]
    name = "general"
    steps = 12
    data = ["distill/corpus/default.jsonl.gz"]

A phase may set :data:`OVERRIDES`; a key it does not set keeps the run's own setting (flags / ``--config``). Each
phase's settings are checked by building the run's :class:`~edgedistill.distill.config.TrainConfig` with them, so a
bad value gets the same message as the flag, prefixed with ``FILE: phase N (name):``. The run's steps are the sum of
the phases'; one warm-up + cosine learning-rate schedule spans them all.

A phase's ``data`` (paths as ``--data``'s, relative to the working directory, else to the schedule file's folder)
is tokenized, split and budgeted as the run's data (``seq_len``, ``val_fraction``, ``train_tokens``; a trimmed
student's tokenizer) and the phase trains on its training split; the held-out evaluation at the end stays the
run's. A phase's batches are a pure function of (seed, phase index, step within the phase): its own
:class:`~edgedistill.distill.steps.BatchOrder` seeded by :func:`phase_seed` (phase 0 keeps the run's seed, so a
one-phase schedule trains exactly as no schedule). Feature projections exist for the union of every phase's layer
pairs (one optimizer state, one checkpoint); a phase uses its own pairs. A teacher-cache run's phases train on the
cache's data only.

This module imports no torch at module level (the configuration loads schedules) and does not import the
configuration module (which imports it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.distill.on_policy import base_objective, is_on_policy
from edgedistill.errors import EdgeDistillError

OVERRIDES = (
    "data",
    "alpha",
    "temperature",
    "loss",
    "logit_weight",
    "feature_weight",
    "feature_loss",
    "feature_layers",
    "attention_weight",
    "attention_layers",
    "relation_heads",
    "on_policy_fraction",
)
PHASE_KEYS = ("name", "steps", *OVERRIDES)


@dataclass(frozen=True)
class Phase:
    """One phase: its 0-based ``index``, global steps ``first_step .. last_step`` and its settings."""

    index: int
    name: str
    steps: int
    first_step: int
    overrides: dict[str, Any]
    config: Any  # the run's TrainConfig with the overrides (steps = this phase's, no schedule)

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "first_step": self.first_step, "overrides": self.overrides}


def _type_error(value: Any, expected: str) -> str | None:
    """Why ``value`` is not of the configuration type ``expected`` (None: it is)."""
    if expected == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value) and value
        return None if ok else f"expected a non-empty list of file names, got {value!r}"
    kinds = {"int": (int,), "float": (int, float), "str": (str,)}[expected]
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"expected {'an' if expected == 'int' else 'a'} {expected}, got {value!r}"
    return None


def load_schedule(path: str | Path, base: Any) -> list[Phase]:
    """The phases of schedule file ``path`` over the run's configuration ``base``; every problem is one
    :class:`EdgeDistillError` naming ``path``, the phase and the key."""
    from edgedistill.config import load_mapping

    data = load_mapping(path)
    extra = sorted(set(data) - {"phase"})
    if extra:
        raise EdgeDistillError(f"{path}: {extra[0]}: unknown key (expected [[phase]] tables only)")
    tables = data.get("phase")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise EdgeDistillError(f"{path}: phase: expected one or more [[phase]] tables")
    types = {f.name: f.type for f in dataclasses.fields(base)}
    phases: list[Phase] = []
    first_step = 1
    for number, table in enumerate(tables, 1):
        name = table.get("name")
        label = f"{path}: phase {number} ({name if isinstance(name, str) and name else '?'})"
        unknown = [key for key in table if key not in PHASE_KEYS]
        if unknown:
            raise EdgeDistillError(f"{label}: {unknown[0]}: unknown key (expected one of {', '.join(PHASE_KEYS)})")
        if not isinstance(name, str) or not name.strip():
            what = "missing" if name is None else f"got {name!r}"
            raise EdgeDistillError(f"{label}: name: {what} (expected a unique non-empty string)")
        twin = next((p for p in phases if p.name == name), None)
        if twin is not None:
            raise EdgeDistillError(
                f"{label}: name: {name!r} is already phase {twin.index + 1}'s name (expected a unique name)"
            )
        steps = table.get("steps")
        if steps is None:
            raise EdgeDistillError(f"{label}: steps: missing (expected a positive integer)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise EdgeDistillError(f"{label}: steps: expected a positive integer, got {steps!r}")
        overrides = {key: table[key] for key in OVERRIDES if key in table}
        for key, value in overrides.items():
            problem = _type_error(value, types[key])
            if problem:
                raise EdgeDistillError(f"{label}: {key}: {problem}")
        if "data" in overrides:  # as --data's, from the working directory, else beside the schedule file
            beside = Path(path).parent
            overrides["data"] = [
                f if Path(f).exists() or not (beside / f).exists() else str(beside / f) for f in overrides["data"]
            ]
        if base.teacher_cache and "data" in overrides and list(overrides["data"]) != list(base.data):
            own = ", ".join(base.data) or "the default corpora"
            raise EdgeDistillError(
                f"{label}: data: a --teacher-cache run trains on the cache's data ({own}); this phase's "
                f"{', '.join(overrides['data'])} cannot use the cache"
            )
        try:
            config = dataclasses.replace(base, schedule="", steps=steps, **overrides)
        except EdgeDistillError as err:
            raise EdgeDistillError(f"{label}: {err}") from None
        if base.teacher_cache and config.loss != "fkl" and config.alpha < 1.0:
            raise EdgeDistillError(
                f"{label}: loss: a teacher cache holds a top-K, which supports fkl only, got {config.loss}"
            )
        phases.append(Phase(number - 1, name, steps, first_step, overrides, config))
        first_step += steps
    return phases


def phase_seed(seed: int, index: int) -> int:
    """The batch-order seed of phase ``index``: the run's for phase 0, else one far from ``seed + epoch`` (the
    sampler's per-epoch seeds) for every other phase."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"edgedistill-phase:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**62)


# ------------------------------------------------------------------------------------------------ the running plan
class Plan:
    """Which phase each step belongs to, its training data and batch order, and its settings applied to the
    objective. A run without a schedule is one unnamed phase with the run's own settings (today's training)."""

    def __init__(
        self,
        config: Any,
        run_data: Any,
        run_sha256: str,
        load_phase_data: Callable[[Any], tuple[Any, str]],
        make_order: Callable[[int, int], Any],
    ) -> None:
        self.config = config
        self.scheduled = bool(config.phases)
        self.phases: list[Phase] = config.phases or [Phase(0, "", config.steps, 1, {}, config)]
        own = [str(f) for f in config.data]
        loaded: dict[tuple[str, ...], tuple[Any, str]] = {}
        self.data: list[Any] = []
        self.data_sha256: list[str] = []
        for phase in self.phases:
            files = tuple(str(f) for f in phase.overrides.get("data", own))
            if list(files) == own:
                data, sha = run_data, run_sha256
            else:
                if files not in loaded:
                    loaded[files] = load_phase_data(phase.config)
                data, sha = loaded[files]
            self.data.append(data)
            self.data_sha256.append(sha)
        self._make_order = make_order
        self._orders: dict[int, Any] = {}
        self.applied: int | None = None

    def locate(self, step: int) -> tuple[Phase, int]:
        """(the phase of global step ``step`` (1-based), the 0-based step within it)."""
        for phase in self.phases:
            if step <= phase.last_step:
                return phase, step - phase.first_step
        raise ValueError(f"step {step} is past the schedule")

    def on_policy(self, step: int) -> bool:
        phase, within = self.locate(step)
        return is_on_policy(within, phase.config.on_policy_fraction)

    def batch_rows(self, step: int, micro: int) -> tuple[Any, list[int]]:
        """(the data, packed rows) of micro-batch ``micro`` of step ``step``."""
        phase, within = self.locate(step)
        if phase.index not in self._orders:
            self._orders = {phase.index: self._make_order(self.data[phase.index].num_sequences, phase.index)}
        order = self._orders[phase.index]
        return self.data[phase.index], order.rows(within * self.config.grad_accum + micro)

    def apply(self, step: int, objective: Any, states: Any) -> Phase:
        """Put step ``step``'s phase settings into the objective (and the feature/attention terms) when the phase
        changes; returns the phase."""
        phase, _ = self.locate(step)
        if self.applied != phase.index:
            set_logit_options(objective, phase.config)
            if states is not None:
                states.set_phase(phase.index)
            self.applied = phase.index
        return phase

    def row(self, phase: Phase, on_policy: bool) -> dict[str, Any]:
        """The phase's entries of a metrics row."""
        return {"on_policy": int(on_policy), **({"phase": phase.name} if self.scheduled else {})}

    def on_policy_steps(self) -> int:
        return sum(self.on_policy(step) for step in range(1, self.config.steps + 1))

    def checkpoint_state(self) -> dict[str, Any]:
        """The training checkpoint's entry of a scheduled run: its phases and their data's fingerprints."""
        return {"schedule": json.dumps(self._fingerprint(), sort_keys=True)} if self.scheduled else {}

    def check_resumed(self, state: dict[str, Any], where: Path) -> None:
        """A checkpoint of another schedule (or of the same file since edited) is not this run's."""
        saved = state.get("schedule")
        current = self.checkpoint_state().get("schedule")
        if saved != current:
            raise EdgeDistillError(
                f"resume: the schedule's phases or their data differ from those the checkpoint in {where} was "
                "trained with"
            )

    def _fingerprint(self) -> list[dict[str, Any]]:
        return [dict(p.record(), data_sha256=sha) for p, sha in zip(self.phases, self.data_sha256)]

    def describe(self) -> dict[str, Any]:
        """``train_summary.json``'s entries: the on-policy share and count, and the phases of a schedule."""
        summary: dict[str, Any] = {
            "on_policy": {"fraction": self.config.on_policy_fraction, "steps": self.on_policy_steps()}
        }
        if self.scheduled:
            summary["on_policy"]["fractions"] = {p.name: p.config.on_policy_fraction for p in self.phases}
            summary["schedule"] = {"file": self.config.schedule, "phases": self._fingerprint()}
        return summary


def set_logit_options(objective: Any, config: Any) -> None:
    """The logit term's settings of ``config`` (a phase's) on the objective."""
    base = base_objective(objective)
    base.options.update(alpha=config.alpha, temperature=config.temperature, name=config.loss)
    base.logit_weight = config.logit_weight
