"""Students: Llama-architecture models sized by preset or shape file, checked against the teacher's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.distill.config import STUDENT_PRESETS, StudentShape, solve_preset_shape
from edgedistill.errors import EdgeDistillError


def teacher_parameter_count(config: Any) -> int:
    """Parameters of the teacher computed from its configuration (no weights needed)."""
    shape = StudentShape(
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        config.intermediate_size,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    count = shape.parameter_count(config.vocab_size)
    if not getattr(config, "tie_word_embeddings", True):
        count += config.vocab_size * config.hidden_size
    return count


def resolve_shape(spec: str, teacher_config: Any, vocab_size: int | None = None) -> StudentShape:
    """``--student``: a preset name (sized against the teacher) or a ``.json``/``.toml`` shape file. A preset's
    parameter target is its share of the teacher's whatever the student's vocabulary (``vocab_size``: a trimmed
    one's rows; default the teacher's): rows a trimmed vocabulary saves go into the layers."""
    if spec in STUDENT_PRESETS:
        return solve_preset_shape(
            spec,
            teacher_params=teacher_parameter_count(teacher_config),
            vocab_size=vocab_size or teacher_config.vocab_size,
            teacher_hidden=teacher_config.hidden_size,
            teacher_layers=teacher_config.num_hidden_layers,
            teacher_heads=teacher_config.num_attention_heads,
            teacher_kv_heads=getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads,
            teacher_intermediate=teacher_config.intermediate_size,
        )
    if Path(spec).suffix.lower() in (".json", ".toml"):
        return StudentShape.from_file(spec)
    raise EdgeDistillError(
        f"student: unknown preset '{spec}' (expected one of {', '.join(STUDENT_PRESETS)}, a .json/.toml shape file "
        "or a checkpoint directory)"
    )


def build_student(shape: StudentShape, teacher_config: Any, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` with tied embeddings and the teacher's vocabulary rows (or
    ``vocab_size`` rows, a trimmed vocabulary's; ``tokenizer`` is then the student's), RoPE, norm epsilon and
    context length, so that it loads with ``AutoModelForCausalLM`` and no remote code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or teacher_config.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=getattr(teacher_config, "max_position_embeddings", 2048),
        rms_norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-5),
        rope_theta=getattr(teacher_config, "rope_theta", 10000.0),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )
    return LlamaForCausalLM(config)


def freeze_embeddings(student: Any) -> None:
    """Stop training the token embedding and the LM head (one tensor when tied)."""
    for module in (student.get_input_embeddings(), student.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def load_student_checkpoint(path: Path, weights: bool = True) -> tuple[Any, Any]:
    """An existing student checkpoint directory (to distil further) and its tokenizer (the model None without
    ``weights``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path)) if weights else None
        return model, AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise EdgeDistillError(f"{path}: cannot load the student checkpoint ({type(err).__name__}: {err})") from None


def init_from_teacher(student: Any, teacher: Any, rows: Any = None) -> list[int]:
    """Copy the teacher's embeddings (its ``rows``, a trimmed vocabulary's teacher ids, or the first rows), final
    norm and every k-th layer into the student; returns the layers copied.

    Needs equal widths (hidden, heads, KV heads, FFN): a narrower student has no place for the teacher's weights.
    """
    s, t = student.config, teacher.config
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(s, name) != getattr(t, name):
            raise EdgeDistillError(
                f"init: --init teacher needs the student's {name} ({getattr(s, name)}) to equal the teacher's "
                f"({getattr(t, name)}); use a shape file with the teacher's width and fewer layers, or --init random"
            )
    if t.model_type != "llama":
        raise EdgeDistillError(f"init: --init teacher needs a Llama teacher, got model_type '{t.model_type}'")
    stride = max(1, t.num_hidden_layers // s.num_hidden_layers)
    copied = [i * stride for i in range(s.num_hidden_layers)]
    embedding = teacher.model.embed_tokens.weight.data
    student.model.embed_tokens.weight.data.copy_(embedding[: s.vocab_size] if rows is None else embedding[rows])
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for student_layer, teacher_index in zip(student.model.layers, copied):
        student_layer.load_state_dict(teacher.model.layers[teacher_index].state_dict())
    return copied


@dataclass(frozen=True)
class VocabAudit:
    """What the vocabulary audit found: the rows distillation compares, and any padding it ignores."""

    tokenizer_size: int
    teacher_rows: int
    student_rows: int

    @property
    def shared_rows(self) -> int:
        return min(self.teacher_rows, self.student_rows)

    @property
    def padded_rows(self) -> int:
        return max(self.teacher_rows, self.student_rows) - self.tokenizer_size


def audit_vocab(
    tokenizer: Any, teacher_rows: int, student_rows: int, student_tokenizer: Any = None, vocab_map: Any = None
) -> VocabAudit:
    """Check that teacher and student speak the same vocabulary before any training.

    Rows beyond the tokenizer's size (Qwen2.5 pads 151,665 tokens to 152,064 rows) carry no token: both models'
    logits are cut to the rows they share, which must cover the tokenizer. A student with its own tokenizer must
    map every token string to the same id as the teacher's, or, with a trimmed vocabulary (``vocab_map``, a
    :class:`~edgedistill.distill.vocab.VocabMap`), to the teacher id its map names.
    """
    size = len(tokenizer)
    if teacher_rows < size:
        raise EdgeDistillError(
            f"vocabulary: the teacher's tokenizer has {size} tokens but its model only {teacher_rows} rows"
        )
    if vocab_map is not None:
        from edgedistill.distill.vocab import check_map

        check_map(tokenizer, student_tokenizer, vocab_map)
        if student_rows < vocab_map.size:
            raise EdgeDistillError(
                f"vocabulary mismatch: the student has {student_rows} output rows, its trimmed tokenizer "
                f"{vocab_map.size} tokens"
            )
        return VocabAudit(vocab_map.size, teacher_rows, student_rows)
    if student_rows < size:
        raise EdgeDistillError(
            f"vocabulary mismatch: the student has {student_rows} output rows, the teacher's tokenizer {size} tokens"
        )
    if student_tokenizer is not None:
        teacher_vocab, student_vocab = tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if teacher_vocab != student_vocab:
            differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])
            token, index = differing[0]
            raise EdgeDistillError(
                f"vocabulary mismatch: teacher and student tokenizers differ ({len(teacher_vocab)} vs "
                f"{len(student_vocab)} tokens; first difference: {token!r} -> {index}); "
                "distillation needs one vocabulary"
            )
    return VocabAudit(size, teacher_rows, student_rows)
