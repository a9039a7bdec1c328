"""The offline top-K teacher cache: round trip, backends, mismatch errors, resume, training from it."""

import json

import numpy as np
import pytest
import torch

from edgedistill.cli import main
from edgedistill.distill.cache import TeacherCache, make_cache, read_manifest
from edgedistill.distill.config import CacheConfig, TrainConfig
from edgedistill.distill.train import train
from edgedistill.errors import EdgeDistillError


def _config(tmp_path, teacher, data, name="cache", **extra):
    values = dict(
        out=str(tmp_path / name),
        teacher=str(teacher),
        data=[str(data)],
        seq_len=16,
        top_k=8,
        rows_per_shard=4,
        batch_size=3,
        teacher_dtype="float32",
    )
    values.update(extra)
    return CacheConfig(**values)


def test_cache_round_trip_matches_the_teacher(tmp_path, tiny_teacher, text_data):
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.data import load_data
    from edgedistill.distill.teacher import load_tokenizer, resolve_teacher

    manifest = make_cache(_config(tmp_path, tiny_teacher, text_data), progress=False)
    assert manifest.complete and manifest.top_k == 8 and manifest.seq_len == 16
    assert manifest.tokens == sum(manifest.splits.values()) * 16
    cache = TeacherCache(tmp_path / "cache")
    tokenizer = load_tokenizer(resolve_teacher(str(tiny_teacher)))
    train_data, heldout, _ = load_data([text_data], tokenizer, 16, 0.1, 1.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for split, data in (("train", train_data), ("heldout", heldout)):
        rows = list(range(min(5, data.num_sequences)))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.from_numpy(data.ids[rows, :-1]).long()).logits, -1)
        records = cache.records(split, rows)
        values, ids = torch.topk(log_probs, 8, -1)
        assert np.array_equal(records["ids"], ids.numpy())
        assert np.allclose(records["logprobs"], values.numpy(), atol=1e-5)
        tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
        assert np.allclose(records["tail"], tail.numpy(), atol=1e-4)
        # the K + 1 buckets are a distribution
        mass = np.exp(records["logprobs"]).sum(-1) + np.exp(records["tail"])
        assert np.allclose(mass, 1.0, atol=1e-5)
        # the label: the log-probability of the data's next token
        label = log_probs.gather(-1, torch.from_numpy(data.ids[rows, 1:]).long().unsqueeze(-1)).squeeze(-1)
        assert np.allclose(records["label"], label.numpy(), atol=1e-5)


def test_teacher_scores_from_the_cache_equal_running_the_teacher(tmp_path, tiny_teacher, text_data):
    """The held-out split and an evaluation-only split score the teacher as evaluation.evaluate does, from the cache."""
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.cache import EVAL_SPLIT
    from edgedistill.distill.data import load_data, load_eval_data, token_byte_lengths
    from edgedistill.distill.evaluation import evaluate
    from edgedistill.distill.teacher import load_tokenizer, resolve_teacher

    outside = tmp_path / "outside.jsonl"
    outside.write_text("\n".join(json.dumps({"text": f"Line {i} of text never trained on."}) for i in range(40)))
    manifest = make_cache(_config(tmp_path, tiny_teacher, text_data, eval_data=[str(outside)]), progress=False)
    assert set(manifest.splits) == {"train", "heldout", EVAL_SPLIT} and manifest.split_sha256[EVAL_SPLIT]
    cache = TeacherCache(tmp_path / "cache")
    tokenizer = load_tokenizer(resolve_teacher(str(tiny_teacher)))
    _, heldout, _ = load_data([text_data], tokenizer, 16, 0.1, 1.0)
    outside_data = load_eval_data([outside], tokenizer, 16)
    lengths = token_byte_lengths(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for split, data in (("heldout", heldout), (EVAL_SPLIT, outside_data)):
        cached = cache.evaluate(split, data, lengths)
        direct = evaluate(model, None, data, 4, torch.device("cpu"), byte_lengths=lengths)
        assert cached["tokens"] == direct["tokens"] and cached["bytes"] == direct["bytes"]
        for key in ("ce", "perplexity", "top1_accuracy", "bits_per_byte"):
            assert cached[key] == pytest.approx(direct[key], rel=1e-4), key
    with pytest.raises(EdgeDistillError, match="other data"):
        cache.evaluate("heldout", outside_data, lengths)
    with pytest.raises(EdgeDistillError, match="no teacher scores"):
        cache.evaluate("nonesuch", heldout, lengths)


def test_interrupted_build_resumes(tmp_path, tiny_teacher, text_data):
    config = _config(tmp_path, tiny_teacher, text_data, name="resumable")
    written = []

    def interrupt(name):
        written.append(name)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_cache(config, progress=False, on_shard=interrupt)
    out = tmp_path / "resumable"
    assert not read_manifest(out).complete
    first = {name: (out / name).stat().st_mtime_ns for name in written}
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    rebuilt = []
    manifest = make_cache(config, progress=False, on_shard=rebuilt.append)
    assert manifest.complete and not set(rebuilt) & set(written)  # finished shards are kept, not recomputed
    assert all((out / name).stat().st_mtime_ns == t for name, t in first.items())
    reference = make_cache(_config(tmp_path, tiny_teacher, text_data, name="straight"), progress=False)
    for name in reference.shard_names("train") + reference.shard_names("heldout"):
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "straight" / name))


def test_cache_build_refuses_a_different_cache_in_place(tmp_path, tiny_teacher, text_data):
    make_cache(_config(tmp_path, tiny_teacher, text_data), progress=False)
    with pytest.raises(EdgeDistillError, match="different top_k"):
        make_cache(_config(tmp_path, tiny_teacher, text_data, top_k=4), progress=False)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_teacher, text_data):
    out = tmp_path_factory.mktemp("cache")
    make_cache(_config(out, tiny_teacher, text_data, name="c"), progress=False)
    return out / "c"


def test_distill_from_cache_without_the_teacher(tmp_path, built_cache, text_data, tiny_shape, monkeypatch):
    from edgedistill.distill import teacher as teachers

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(teachers, "load_model", no_teacher)
    config = TrainConfig(
        out=str(tmp_path / "student"),
        teacher_cache=str(built_cache),
        student=str(tiny_shape),
        data=[str(text_data)],
        steps=4,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
    )
    summary = train(config, progress=False)
    assert summary["teacher"]["top_k"] == 8 and summary["teacher"]["cache"] == str(built_cache)
    heldout = summary["heldout"]
    assert 0 <= heldout["top1_agreement"] <= 1 and heldout["kd_to_teacher"] > 0
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5) for r in rows)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"seq_len": 8}, "built with --seq-len 16"),
        ({"val_fraction": 0.3}, "data differ"),
        ({"loss": "rkl"}, "supports fkl only"),
        ({"init": "teacher"}, "needs the teacher's weights"),
    ],
)
def test_cache_mismatch_stops_before_training(tmp_path, built_cache, text_data, tiny_shape, override, message):
    values = dict(
        out=str(tmp_path / "s"),
        teacher_cache=str(built_cache),
        student=str(tiny_shape),
        data=[str(text_data)],
        steps=2,
        batch_size=2,
        seq_len=16,
    )
    values.update(override)
    with pytest.raises(EdgeDistillError, match=message):
        train(TrainConfig(**values), progress=False)
    assert not (tmp_path / "s" / "metrics.jsonl").exists()


def test_cache_cli_and_bad_inputs(tmp_path, tiny_teacher, text_data, capsys):
    out = tmp_path / "cli-cache"
    assert (
        main(
            [
                "teacher-cache",
                "--teacher",
                str(tiny_teacher),
                "--data",
                str(text_data),
                "--seq-len",
                "16",
                "--top-k",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top_k"] == 4
    assert (
        main(
            [
                "teacher-cache",
                "--teacher",
                str(tiny_teacher),
                "--top-k",
                "100000",
                "--data",
                str(text_data),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "top_k: expected 1 to 320" in capsys.readouterr().err
    assert (
        main(["teacher-cache", "--teacher", str(tiny_teacher), "--backend", "llama.cpp", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "llama.cpp needs a .gguf teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher-cache", str(tmp_path / "none"), "--out", str(tmp_path / "z")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_and_torch_backends_agree_on_an_f32_gguf(tmp_path, tiny_teacher, text_data):
    from export_helpers import run_export

    assert (
        run_export("gguf", str(tiny_teacher), "--quant", "f32", "--out", str(tmp_path / "gguf"), "--threads", "1") == 0
    )
    gguf = next((tmp_path / "gguf").glob("*-f32.gguf"))
    make_cache(_config(tmp_path, tiny_teacher, text_data, name="torch"), progress=False)
    make_cache(_config(tmp_path, gguf, text_data, name="llama", backend="llama.cpp", threads=1), progress=False)
    torch_manifest, llama_manifest = read_manifest(tmp_path / "torch"), read_manifest(tmp_path / "llama")
    assert torch_manifest.data_sha256 == llama_manifest.data_sha256  # the same tokens, tokenized from the GGUF
    a, b = TeacherCache(tmp_path / "torch"), TeacherCache(tmp_path / "llama")
    rows = list(range(torch_manifest.splits["train"]))
    ra, rb = a.records("train", rows), b.records("train", rows)
    # Stated tolerance: log-probabilities within 2e-3; the top-1 and the top-K ids identical wherever the teacher's
    # candidates are more than that apart (a random tiny model has many near-ties).
    tolerance = 2e-3
    assert np.abs(ra["logprobs"] - rb["logprobs"]).max() < tolerance
    assert np.abs(ra["tail"] - rb["tail"]).max() < tolerance
    clear_top1 = (ra["logprobs"][..., 0] - ra["logprobs"][..., 1]) > tolerance
    assert clear_top1.mean() > 0.5
    assert np.array_equal(ra["ids"][..., 0][clear_top1], rb["ids"][..., 0][clear_top1])
    # The K-th place can swap with the (K+1)-th, which the cache does not store: compare whole sets.
    same_sets = np.all(np.sort(ra["ids"], -1) == np.sort(rb["ids"], -1), -1)
    assert same_sets.mean() > 0.95


def test_cache_speed_bench_measures_a_build(tiny_teacher, text_data, capsys):
    from edgedistill.bench import cache_speed

    argv = [
        "--teacher",
        str(tiny_teacher),
        "--data",
        str(text_data),
        "--seq-len",
        "16",
        "--backends",
        "torch",
        "--build-rows",
        "4",
        "--top-k",
        "4",
        "--threads",
        "1",
    ]
    assert cache_speed.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["build"]["torch"]["tokens"] == 4 * 16 and result["build"]["torch"]["tokens_per_second"] > 0
