"""Typed configuration for distillation: the student's shape and the training run. Imports without torch."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Student presets, as a fraction of the teacher's parameter count. Source: the seed document's size table
# (MiniMind 104M teacher -> Small 26M, Tiny 13M, Nano 6.5M), i.e. 1/4, 1/8 and 1/16 of the teacher.
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(fraction=1 / 4),  # seed: MiniMind-Small, 26M of 104M
    "tiny": dict(fraction=1 / 8),  # seed: MiniMind-Tiny, 13M of 104M
    "nano": dict(fraction=1 / 16),  # seed: MiniMind-Nano, 6.5M of 104M
}
# A preset shape counts as a match when its parameter count is within this share of the target.
PRESET_TOLERANCE = 0.05

SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


@dataclass(frozen=True)
class StudentShape:
    """The shape of a Llama-architecture student; vocabulary, RoPE and norms come from the teacher."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgeDistillError(f"student shape: field '{name}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise EdgeDistillError(
                f"student shape: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgeDistillError(
                f"student shape: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self, vocab_size: int) -> int:
        """Parameters of a LlamaForCausalLM of this shape with tied embeddings and no biases."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h  # q,o + k,v + mlp + 2 norms
        return vocab_size * h + self.num_hidden_layers * per_layer + h

    @classmethod
    def from_file(cls, path: str | Path) -> StudentShape:
        """Read a shape from a JSON or TOML file holding exactly the fields in ``SHAPE_FIELDS``."""
        data = load_mapping(path)
        unknown = sorted(set(data) - set(SHAPE_FIELDS))
        missing = [name for name in SHAPE_FIELDS if name not in data]
        if unknown:
            raise EdgeDistillError(
                f"{path}: unknown student shape field '{unknown[0]}' (expected {', '.join(SHAPE_FIELDS)})"
            )
        if missing:
            raise EdgeDistillError(f"{path}: student shape field '{missing[0]}' is missing")
        try:
            return cls(**data)
        except EdgeDistillError as err:
            raise EdgeDistillError(f"{path}: {err}") from None


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Load a JSON or TOML file that must hold a table; errors name the file and, for JSON, the line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such file")
    if path.suffix.lower() not in (".json", ".toml"):
        raise EdgeDistillError(f"{path}: expected a .json or .toml file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise EdgeDistillError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EdgeDistillError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        except RecursionError:
            raise EdgeDistillError(f"{path}: invalid JSON: nested too deeply") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            # tomllib's message ends with "(at line L, column C)": lift the line into the usual file:line prefix
            found = re.fullmatch(r"(.*) \(at line (\d+), column \d+\)", str(err))
            where = f"{path}:{found.group(2)}" if found else str(path)
            raise EdgeDistillError(f"{where}: invalid TOML: {str(err).splitlines()[0]}") from None
        except RecursionError:
            raise EdgeDistillError(f"{path}: invalid TOML: nested too deeply") from None
    if not isinstance(data, dict):
        raise EdgeDistillError(f"{path}: expected a table of fields, got {type(data).__name__}")
    return data


def solve_preset_shape(
    preset: str,
    *,
    teacher_params: int,
    vocab_size: int,
    teacher_hidden: int,
    teacher_layers: int,
    teacher_heads: int,
    teacher_kv_heads: int,
    teacher_intermediate: int,
) -> StudentShape:
    """The student shape for a preset: about ``fraction`` of the teacher's parameters, Llama-style proportions.

    The search keeps the teacher's head size and FFN ratio, tries every width that is a multiple of the head size
    up to the teacher's and the depth that best meets the target at that width, and among the shapes within
    ``PRESET_TOLERANCE`` of the target picks the one whose depth-to-width ratio is closest to the teacher's
    (so a student is neither a one-layer giant embedding nor a 100-layer thread). With none within tolerance it
    takes the closest count.
    """
    if preset not in STUDENT_PRESETS:
        raise EdgeDistillError(
            f"unknown student preset '{preset}' "
            f"(expected one of {', '.join(STUDENT_PRESETS)} or a .json/.toml shape file)"
        )
    target = teacher_params * STUDENT_PRESETS[preset]["fraction"]
    head_dim = teacher_hidden // teacher_heads
    kv_ratio = teacher_kv_heads / teacher_heads
    ffn_ratio = teacher_intermediate / teacher_hidden
    teacher_aspect = teacher_layers / teacher_hidden
    candidates: list[tuple[float, float, StudentShape]] = []
    for heads in range(1, teacher_heads + 1):
        hidden = heads * head_dim
        kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, round(heads * kv_ratio)))
        ffn = max(16, int(round(hidden * ffn_ratio / 16)) * 16)
        one_layer = StudentShape(hidden, 1, heads, kv_heads, ffn)
        base = vocab_size * hidden + hidden
        per_layer = one_layer.parameter_count(vocab_size) - base
        layers = min(teacher_layers, max(1, round((target - base) / per_layer)))
        shape = dataclasses.replace(one_layer, num_hidden_layers=layers)
        error = abs(math.log(shape.parameter_count(vocab_size) / target))
        aspect_gap = abs(math.log((layers / hidden) / teacher_aspect))
        candidates.append((error, aspect_gap, shape))
    within = [c for c in candidates if c[0] <= math.log1p(PRESET_TOLERANCE)]
    if within:
        return min(within, key=lambda c: c[1])[2]
    return min(candidates, key=lambda c: c[0])[2]


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _checked_value(name: str, expected: str, value: Any, where: str) -> Any:
    """``value`` for a field of type ``expected`` ("int", "float", "list[str]", ...), an int promoted to a float
    where a float is expected; anything else is an error naming ``where`` (the config file, if it set the value)."""
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected in _SCALARS:
        if type(value).__name__ != expected:
            raise EdgeDistillError(f"{where}{name}: expected a {expected}, got {value!r}")
        if expected == "float" and not math.isfinite(value):
            raise EdgeDistillError(f"{where}{name}: expected a finite number, got {value!r}")
        if name == "device":  # the same setting in every run configuration (training, teacher cache, pipeline)
            try:
                check_device(value)
            except EdgeDistillError as err:
                raise EdgeDistillError(f"{where}{err}") from None
        return value
    found = re.fullmatch(r"list\[(\w+)\]", expected)
    if found:
        item_type = found.group(1)
        items = value if isinstance(value, list) else [value]
        # flags give lists of strings (``nargs="+"``): a list[int] field converts them in its __post_init__
        allowed = (str,) if item_type == "str" else (_SCALARS[item_type], str)
        if not all(isinstance(v, allowed) and not isinstance(v, bool) for v in items):
            noun = {"str": "strings", "int": "integers", "float": "numbers"}.get(item_type, item_type)
            raise EdgeDistillError(f"{where}{name}: expected a list of {noun}, got {value!r}")
    return value


class FlagConfig:
    """Shared by the run configurations: built from defaults, a config file and CLI flags; dumped as a dict."""

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> Any:
        """Defaults, then :meth:`preset` values, then the config file's keys, then explicit flags; unknown keys in
        the file are errors, and a wrongly typed value from the file is reported with the file's name."""
        from_file: dict[str, Any] = {}
        if config_file:
            names = {f.name for f in dataclasses.fields(cls)}
            for key, value in load_mapping(config_file).items():
                name = key.replace("-", "_")
                if name not in names:
                    raise EdgeDistillError(f"{config_file}: unknown setting '{key}'")
                from_file[name] = value
        flags = {k: v for k, v in overrides.items() if v is not None}
        chosen = {**from_file, **flags}
        values = {**cls.preset(chosen), **chosen}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            where = f"{config_file}: " if name in from_file and name not in flags else ""
            values[name] = _checked_value(name, types[name], value, where)
        try:
            return cls(**values)
        except EdgeDistillError as err:
            # __post_init__ names the field; say which file it came from when a file set it
            name = str(err).split(":", 1)[0]
            if name in from_file and name not in flags:
                raise EdgeDistillError(f"{config_file}: {err}") from None
            raise

    def check_finite(self) -> None:
        """Refuse NaN and infinity in every float field: they pass every range check (``nan < 0`` is false) and
        then turn the run's losses into NaN. Called by :meth:`from_sources` and the ``__post_init__`` methods."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "float" and isinstance(value, float) and not math.isfinite(value):
                raise EdgeDistillError(f"{item.name}: expected a finite number, got {value!r}")

    @classmethod
    def preset(cls, chosen: dict[str, Any]) -> dict[str, Any]:
        """Values that replace the defaults given what the file and flags chose (none here)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl")
INITS = ("random", "teacher")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = "auto, cpu, cuda or cuda:N"
# torch.manual_seed takes a 64-bit seed; the sampler's generator a signed one
MAX_SEED = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


def check_device(value: str) -> None:
    """``--device``: the spellings :func:`edgedistill.distill.heads.resolve_device` accepts (CUDA's presence is
    checked there, when the run starts)."""
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value)):
        raise EdgeDistillError(f"device: expected {DEVICES}, got {value!r}")


@dataclass
class TrainConfig(FlagConfig):
    """One distillation run. Every field is also a CLI flag (``--field-name``) and a key of ``--config FILE``."""

    out: str = ""
    teacher: str = "smollm2-135m"
    teacher_cache: str = ""  # a directory made by `edgedistill teacher-cache`: train without loading the teacher
    student: str = "tiny"
    init: str = "random"
    data: list[str] = field(default_factory=list)  # empty: the embedded default corpus
    alpha: float = 0.5  # seed: MiniMind's default
    temperature: float = 1.0  # seed: MiniMind's train_distillation.py default
    loss: str = "fkl"
    jsd_beta: float = 0.5
    skew: float = 0.1  # DistiLLM's skew
    tag_weight: float = 10.0  # seed: train_distill_reason.py up-weights the reasoning tags 10x
    # MiniMind's 5e-6 fine-tunes a pretrained student; a randomly initialised student needs a far larger rate.
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine down to 10 % of the peak, as MiniMind
    warmup_steps: int = -1  # -1: 5 % of the steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    teacher_dtype: str = "auto"
    # the student's matmuls (mixed precision: fp32 weights, optimizer and softmax); auto = bf16 where it is native
    precision: str = "auto"
    threads: int = 0  # 0: torch's default
    resume: bool = False
    save_every: int = 50
    val_fraction: float = 0.1
    train_tokens: int = 0  # 0: every training sequence; else that many tokens in evenly spaced sequences
    heldout_tokens: int = 0  # the same for the held-out split (a teacher cache must be built with the same values)
    eval_tokens: int = 0  # 0: all held-out tokens
    skip_bad_lines: bool = False
    log_every: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> EdgeDistillError:
            return EdgeDistillError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        self.check_finite()
        if isinstance(self.data, str):
            self.data = [self.data]
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "a number in [0, 1]")
        if not self.temperature > 0:
            raise bad("temperature", "a positive number")
        if self.loss not in LOSSES:
            raise bad("loss", f"one of {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise bad("init", f"one of {', '.join(INITS)}")
        for name in ("teacher_dtype", "precision"):
            if getattr(self, name) not in DTYPES:
                raise bad(name, f"one of {', '.join(DTYPES)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise bad("jsd_beta", "a number in [0, 1]")
        if not 0.0 <= self.skew < 1.0:
            raise bad("skew", "a number in [0, 1)")
        if not 0 <= self.tag_weight <= FLOAT32_MAX:  # label weights are float32
            raise bad("tag_weight", f"a non-negative number no larger than {FLOAT32_MAX:.4g}")
        if not 0 < self.lr <= 1:  # AdamW moves every weight by about lr per step; far larger overflows float32
            raise bad("lr", "a positive number no larger than 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise bad(name, "a positive integer")
        for name in ("threads", "eval_tokens", "train_tokens", "heldout_tokens"):
            if getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad("val_fraction", "a number in (0, 1)")
        if self.grad_clip < 0:
            raise bad("grad_clip", "a non-negative number (0 disables clipping)")
        if not 0 <= self.weight_decay * self.lr <= 1:  # AdamW multiplies each weight by 1 - lr * weight_decay
            raise bad("weight_decay", f"a non-negative number no larger than 1 / lr = {1 / self.lr:g}")
        if self.warmup_steps < -1:
            raise bad("warmup_steps", "-1 (5 % of the steps) or a non-negative integer")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"an integer in [0, {MAX_SEED}]")
        check_device(self.device)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else max(1, self.steps // 20)


@dataclass
class CacheConfig(FlagConfig):
    """One teacher-cache build (``edgedistill teacher-cache``); data packing as in :class:`TrainConfig`."""

    out: str = ""
    teacher: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)  # empty: the embedded default corpus
    seq_len: int = 256
    top_k: int = 64
    backend: str = "torch"
    batch_size: int = 8
    rows_per_shard: int = 256
    val_fraction: float = 0.1
    train_tokens: int = 0
    heldout_tokens: int = 0
    skip_bad_lines: bool = False
    device: str = "auto"
    teacher_dtype: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        self.check_finite()
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.out:
            raise EdgeDistillError("out: expected a cache directory (--out DIR)")
        check_device(self.device)
        if self.backend not in ("torch", "llama.cpp"):
            raise EdgeDistillError(f"backend: expected torch or llama.cpp, got {self.backend!r}")
        if self.teacher_dtype not in DTYPES:
            raise EdgeDistillError(f"teacher_dtype: expected one of {', '.join(DTYPES)}, got {self.teacher_dtype!r}")
        for name in ("train_tokens", "heldout_tokens"):
            if getattr(self, name) < 0:
                raise EdgeDistillError(f"{name}: expected 0 (all) or a positive integer, got {getattr(self, name)!r}")
        for name in ("seq_len", "top_k", "batch_size", "rows_per_shard"):
            if getattr(self, name) <= 0:
                raise EdgeDistillError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.threads < 0:
            raise EdgeDistillError(f"threads: expected 0 (the default) or a positive integer, got {self.threads!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise EdgeDistillError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
