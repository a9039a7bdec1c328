"""Student presets, shape files, run configuration and teacher resolution (no weights needed)."""

import json
from types import SimpleNamespace

import pytest

from edgedistill.distill.config import StudentShape, TrainConfig
from edgedistill.distill.student import resolve_shape, teacher_parameter_count
from edgedistill.errors import EdgeDistillError

# SmolLM2-135M's configuration (FACTS.md): 134.5 M parameters.
SMOLLM2 = SimpleNamespace(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    tie_word_embeddings=True,
)


def test_teacher_parameter_count_matches_smollm2():
    assert teacher_parameter_count(SMOLLM2) == 134_515_008


@pytest.mark.parametrize("preset, fraction", [("small", 1 / 4), ("tiny", 1 / 8), ("nano", 1 / 16)])
def test_presets_follow_the_seed_size_table(preset, fraction):
    shape = resolve_shape(preset, SMOLLM2)
    ratio = shape.parameter_count(SMOLLM2.vocab_size) / (134_515_008 * fraction)
    assert 0.95 <= ratio <= 1.05, (preset, shape, ratio)
    assert shape.head_dim == 64 and shape.hidden_size <= 576 and shape.num_hidden_layers <= 30


def test_preset_parameter_count_equals_the_built_model():
    from conftest import make_tokenizer

    from edgedistill.distill.student import build_student

    tokenizer = make_tokenizer()
    teacher = SimpleNamespace(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
    )
    shape = resolve_shape("tiny", teacher)
    model = build_student(shape, teacher, tokenizer)
    assert sum(p.numel() for p in model.parameters()) == shape.parameter_count(len(tokenizer))
    assert model.config.tie_word_embeddings and model.config.eos_token_id == tokenizer.eos_token_id


def test_shape_file_json_and_toml(tmp_path):
    fields = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    )
    (tmp_path / "s.json").write_text(json.dumps(fields))
    (tmp_path / "s.toml").write_text("\n".join(f"{k} = {v}" for k, v in fields.items()))
    assert (
        StudentShape.from_file(tmp_path / "s.json")
        == StudentShape.from_file(tmp_path / "s.toml")
        == StudentShape(**fields)
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"hidden_size": 64}', "field 'num_hidden_layers' is missing"),
        (
            '{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
            '"intermediate_size": 128, "layers": 3}',
            "unknown student shape field 'layers'",
        ),
        (
            '{"hidden_size": 60, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, '
            '"intermediate_size": 128}',
            "not divisible by num_attention_heads",
        ),
        (
            '{"hidden_size": -64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
            '"intermediate_size": 128}',
            "'hidden_size' must be a positive integer",
        ),
        ('{"hidden_size": 64,\n "num_hidden_layers": }', ":2: invalid JSON"),
        ("[1, 2]", "expected a table of fields"),
    ],
)
def test_bad_shape_file(tmp_path, content, message):
    path = tmp_path / "shape.json"
    path.write_text(content)
    with pytest.raises(EdgeDistillError) as caught:
        StudentShape.from_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_unknown_preset():
    with pytest.raises(EdgeDistillError, match="unknown preset 'huge'"):
        resolve_shape("huge", SMOLLM2)


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('alpha = 1\nsteps = 7\nloss = "jsd"\ndata = ["a.jsonl", "b.jsonl"]\n')
    config = TrainConfig.from_sources(str(path), {"steps": 9, "out": "x", "lr": None})
    assert config.alpha == 1.0 and config.steps == 9 and config.loss == "jsd" and config.data == ["a.jsonl", "b.jsonl"]
    assert config.lr == TrainConfig().lr


@pytest.mark.parametrize(
    "content, message",
    [
        ("alpha = 2.0\n", "alpha: expected a number in [0, 1]"),
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ('steps = "many"\n', "steps: expected a int"),
        ('loss = "mse"\n', "loss: expected one of"),
    ],
)
def test_bad_config_file(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_text(content)
    with pytest.raises(EdgeDistillError) as caught:
        TrainConfig.from_sources(str(path), {})
    assert message in str(caught.value)


def test_named_teacher_resolves_to_the_packaged_gguf():
    from edgedistill.distill.teacher import resolve_teacher

    source = resolve_teacher("smollm2-135m")
    assert source.kind == "gguf" and source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.read_bytes()[:4] == b"GGUF"


def test_teacher_errors(tmp_path):
    from edgedistill.distill.teacher import resolve_teacher

    with pytest.raises(EdgeDistillError, match="no such file or directory"):
        resolve_teacher(str(tmp_path / "nothing"))
    with pytest.raises(EdgeDistillError, match="without config.json"):
        resolve_teacher(str(tmp_path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(EdgeDistillError, match="not a GGUF file"):
        resolve_teacher(str(fake))


def test_default_teacher_tokenizer_matches_llama_cpp_conventions():
    """No BOS prepended, EOS is <|im_end|>, ChatML template (FACTS.md), unlike transformers' own conversion."""
    from edgedistill.distill.teacher import load_tokenizer, resolve_teacher

    tokenizer = load_tokenizer(resolve_teacher("smollm2-135m"))
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    ids = tokenizer("Hello world").input_ids
    assert ids == [19556, 905]
    assert tokenizer.decode(tokenizer("a  b\n\tc é 日本 <|im_start|>").input_ids) == "a  b\n\tc é 日本 <|im_start|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer("<|im_start|>user").input_ids
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_gguf_teacher_is_converted_once_and_then_read_from_the_cache(tmp_path, tiny_teacher, monkeypatch):
    """The first load of a GGUF teacher stores its dequantized checkpoint; later loads of the configuration and the
    weights read it and give the same model; a copy missing its weights is rebuilt (and a temporary copy a killed
    process left a day ago is swept); an unwritable cache only costs the speed-up."""
    import os
    import time

    import torch
    from export_helpers import run_export

    from edgedistill.distill import teacher as teachers
    from edgedistill.files import make_temp_dir

    assert run_export("gguf", str(tiny_teacher), "--quant", "f32", "--out", str(tmp_path / "g"), "--threads", "1") == 0
    source = teachers.resolve_teacher(str(next((tmp_path / "g").glob("*-f32.gguf"))))
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    assert teachers.converted_checkpoint(source) is None
    direct_config = teachers.load_config(source)  # read from the file: nothing stored yet
    assert teachers.converted_checkpoint(source) is None
    first = teachers.load_model(source)
    stored = teachers.converted_checkpoint(source)
    assert stored is not None and stored.parent.parent == tmp_path / "cache"
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    again, config = teachers.load_model(source), teachers.load_config(source)
    assert config.to_dict()["hidden_size"] == direct_config.hidden_size == 64
    ids = torch.arange(40).reshape(2, 20)
    assert torch.equal(first(ids).logits, again(ids).logits)
    assert teachers.load_model(source, torch.bfloat16).dtype == torch.bfloat16

    stale = make_temp_dir(stored.parent, stored.name)  # a copy of a process killed while saving, a day ago
    os.utime(stale, (time.time() - 2 * teachers.STALE_TEMP_S,) * 2)
    fresh = make_temp_dir(stored.parent, stored.name)  # one that may still be writing
    (stored / "model.safetensors").unlink()  # a damaged copy is not used, and the next load replaces it
    assert teachers.converted_checkpoint(source) is None
    assert torch.equal(teachers.load_model(source)(ids).logits, first(ids).logits)
    assert teachers.converted_checkpoint(source) == stored
    assert not stale.exists() and fresh.exists()  # the rebuild swept the stale copy only

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(blocked))
    assert torch.equal(teachers.load_model(source)(ids).logits, first(ids).logits)
    assert teachers.converted_checkpoint(source) is None
