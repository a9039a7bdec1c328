"""The export skeleton and its format registry: the registry lists gguf and onnx with their quantizations, is
fixed once built, and a new format (here a toy that writes the weights as ``.npz``) is one class plus one
registration, exported through the real skeleton and CLI with its manifest record, staged and then published.
Also the export recipe as a FlagConfig: ``--config`` TOML files, flags over the file, errors that name the file."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
from export_helpers import last_json_line, read_manifest, run_export, save_checkpoint

from edgedistill.errors import EdgeDistillError
from edgedistill.export.formats import ExportFormat, FormatRegistry, export_artifacts
from edgedistill.export.manifest import publish_with_manifest
from edgedistill.export.parity import GREEDY_TOKENS, Thresholds, judge, torch_reference
from edgedistill.export.recipe import ExportRecipe
from edgedistill.export.registry import FORMATS
from edgedistill.files import is_temp_name

# ------------------------------------------------------------------------------------------ a toy format


@dataclass(frozen=True)
class NpzQuant:
    dtype: str
    thresholds: Thresholds


class NpzFormat(ExportFormat):
    """The model's weights as one NumPy ``.npz`` file; checked by loading them back into the PyTorch model."""

    name = "npz"
    quants = {
        "f32": NpzQuant("float32", Thresholds(1e-5, 1e-6, min_top1=1.0, greedy_equal=True)),
        "f16": NpzQuant("float16", Thresholds(0.5, 0.05, min_top1=0.9, greedy_equal=False)),
    }
    default_quants = ("f32",)
    base_quant = "f32"
    tools = ("numpy", "torch")
    converted = "wrote the float32 arrays"

    def artifact_name(self, model_name, quant):
        return f"{model_name}-{quant}.npz"

    def convert(self, job, plan, base):
        arrays = {name: t.detach().float().numpy() for name, t in job.loaded.model.state_dict().items()}
        with open(base, "wb") as handle:  # a handle: np.savez would append .npz to the temporary name
            np.savez(handle, **arrays)

    def derive(self, job, conversion, quant, artifact):
        with np.load(conversion.path) as base, open(artifact, "wb") as handle:
            np.savez(handle, **{name: base[name].astype(self.quants[quant].dtype) for name in base.files})

    def check(self, job, conversion, quant, artifact):
        import torch

        model = copy.deepcopy(job.loaded.model)
        with np.load(artifact) as arrays:
            model.load_state_dict({name: torch.from_numpy(arrays[name].astype(np.float32)) for name in arrays.files})
        reference = job.reference
        answers = torch_reference(model, reference.prompt_ids, len(reference.greedy), GREEDY_TOKENS)
        total = len(job.probes.strings)  # the tokenizer is the source's own: nothing to compare
        return judge(self.thresholds(quant), reference, answers.logits, answers.greedy, total, total)

    def details(self, job, conversion, quant, artifact, parity_seconds):
        with np.load(artifact) as arrays:
            count = len(arrays.files)
        return {"dtype": self.quants[quant].dtype, "arrays": count, "tools": conversion.tools}


NPZ = NpzFormat()
TOY_FORMATS = FORMATS.plus(NPZ)  # the one registration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


# ------------------------------------------------------------------------------------------------- registry


def test_registry_lists_gguf_and_onnx_with_their_quantizations():
    assert list(FORMATS) == ["gguf", "onnx"]
    gguf, onnx = FORMATS["gguf"], FORMATS["onnx"]
    assert list(gguf.quants) == ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
    assert gguf.default_quants == ("f16", "q8_0", "q4_k_m") and gguf.base_quant == "f32"
    assert list(onnx.quants) == ["fp32", "int8", "int4"]
    assert onnx.default_quants == ("fp32", "int8", "int4") and onnx.base_quant == "fp32"
    for fmt in FORMATS.values():
        assert all(isinstance(fmt.thresholds(q), Thresholds) for q in fmt.quants)
    assert FORMATS.select("gguf", []) == (gguf, ["f16", "q8_0", "q4_k_m"])
    assert FORMATS.select("onnx", ["int4"]) == (onnx, ["int4"])
    assert "gguf: f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0 (default f16,q8_0,q4_k_m)" in FORMATS.quant_help()


def test_registry_is_fixed_once_built():
    assert list(TOY_FORMATS) == ["gguf", "onnx", "npz"]
    assert "npz" not in FORMATS  # building another registry changed nothing shared
    assert not hasattr(FORMATS, "__setitem__")
    with pytest.raises(ValueError, match="registered twice"):
        FORMATS.plus(FORMATS["gguf"])

    class Broken(NpzFormat):
        default_quants = ("q4",)

    with pytest.raises(ValueError, match="'q4' is not in its quantization table"):
        FormatRegistry(Broken())
    with pytest.raises(EdgeDistillError, match="^format: unknown format 'npz'; choose from gguf, onnx$"):
        FORMATS.select("npz", [])
    with pytest.raises(EdgeDistillError, match="^--quant: unknown npz quantization 'q4'; choose from f32, f16$"):
        TOY_FORMATS.select("npz", ["q4"])


# ------------------------------------------------------------------------------------ the toy through export


def test_toy_format_exports_through_the_skeleton(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    argv = ("npz", str(checkpoint), "--quant", "f32,f16", "--out", str(out), "--threads", "1")
    code = run_export(*argv, formats=TOY_FORMATS)
    assert code == 0
    captured = capsys.readouterr()
    summary = last_json_line(captured.out)
    assert summary["format"] == "npz" and summary["passed"] is True
    # The float32 artifact is the conversion itself, checked last.
    assert [a["path"] for a in summary["artifacts"]] == ["tiny-llama-f16.npz", "tiny-llama-f32.npz"]
    lines = captured.err.splitlines()
    assert lines[0].startswith("export: loaded ")
    assert lines[1].startswith("npz: wrote the float32 arrays (") and lines[1].endswith("s")
    assert lines[2].startswith("npz: tiny-llama-f16.npz: ") and lines[2].endswith("; parity passed")

    records = {r["quantization"]: r for r in read_manifest(out)["artifacts"]}
    assert set(records) == {"f32", "f16"}
    for quant, record in records.items():
        path = out / record["path"]
        assert record["format"] == "npz" and record["passed"], record["parity"]["failures"]
        assert record["bytes"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["f32_bytes"] == (out / "tiny-llama-f32.npz").stat().st_size
        assert record["source"]["kind"] == "hf" and record["source"]["name"] == "tiny-llama"
        assert record["details"]["dtype"] == {"f32": "float32", "f16": "float16"}[quant]
        assert record["details"]["tools"]["numpy"] == np.__version__
    assert records["f32"]["parity"]["max_logit_diff"] == 0.0 and records["f32"]["parity"]["greedy_equal"]
    assert 0 < records["f16"]["parity"]["max_logit_diff"] < 0.5
    assert records["f16"]["size_ratio_to_f32"] == pytest.approx(0.5, abs=0.05)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tiny-llama-f16.npz", "tiny-llama-f32.npz"]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with np.load(out / "tiny-llama-f32.npz") as arrays:
        for name, tensor in model.state_dict().items():
            assert np.array_equal(arrays[name], tensor.numpy()), name


def _toy_job(checkpoint):
    from edgedistill.export.parity import probe_prompt_ids
    from edgedistill.export.source import load_source, resolve_source

    source = resolve_source(str(checkpoint))
    loaded = load_source(source)
    reference = torch_reference(loaded.model, probe_prompt_ids(loaded.tokenizer, 512), 1, GREEDY_TOKENS)
    return source, loaded, reference


def test_toy_artifacts_are_staged_then_published_together(tmp_path, checkpoint):
    """The skeleton leaves every artifact under a temporary name; one publish renames them and writes the
    manifest; the float32 conversion, not asked for, is gone."""
    source, loaded, reference = _toy_job(checkpoint)
    staged = export_artifacts(NPZ, source, loaded, ["f16"], tmp_path, reference, ["a b"], 1, progress=lambda _: None)
    assert [s.record.path for s in staged] == ["tiny-llama-f16.npz"]
    assert all(is_temp_name(p.name) for p in tmp_path.iterdir())
    assert [p for p in tmp_path.iterdir()] == [staged[0].tmp]
    publish_with_manifest(tmp_path, staged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "tiny-llama-f16.npz"]
    assert read_manifest(tmp_path)["artifacts"][0]["path"] == "tiny-llama-f16.npz"


def test_interrupted_toy_export_leaves_nothing(tmp_path, checkpoint):
    source, loaded, reference = _toy_job(checkpoint)

    def stop_after_first_artifact(line: str) -> None:
        if ".npz:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_artifacts(
            NPZ, source, loaded, ["f16", "f32"], tmp_path, reference, ["a b"], 1, stop_after_first_artifact
        )
    assert list(tmp_path.iterdir()) == []


def test_unknown_toy_quantization_fails_before_loading(tmp_path, checkpoint):
    with pytest.raises(EdgeDistillError, match="^--quant: unknown npz quantization 'q4'; choose from f32, f16$"):
        run_export("npz", str(checkpoint), "--quant", "q4", "--out", str(tmp_path / "out"), formats=TOY_FORMATS)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the recipe's settings


def _recipe(*argv: str, formats=FORMATS) -> ExportRecipe:
    import argparse

    from edgedistill.export.cli import add_args

    parser = argparse.ArgumentParser(prog="edgedistill export")
    add_args(parser, formats)
    return ExportRecipe.from_args(parser.parse_args(list(argv)), formats)


def test_config_file_sets_the_recipe_and_flags_win(tmp_path, checkpoint, capsys):
    config = tmp_path / "export.toml"
    config.write_text('quant = ["f16"]\nthreads = 1\nname = "from-toml"\nallow-mismatch = true\n')
    recipe = _recipe("gguf", "model", "--out", "o", "--config", str(config))
    assert (recipe.quant, recipe.threads, recipe.name, recipe.allow_mismatch) == (["f16"], 1, "from-toml", True)
    recipe = _recipe("gguf", "model", "--out", "o", "--config", str(config), "--quant", "q8_0,q4_0", "--name", "x")
    assert (recipe.quant, recipe.name, recipe.threads) == (["q8_0", "q4_0"], "x", 1)

    out = tmp_path / "out"
    assert run_export("npz", str(checkpoint), "--out", str(out), "--config", str(config), formats=TOY_FORMATS) == 0
    assert [a["path"] for a in last_json_line(capsys.readouterr().out)["artifacts"]] == ["from-toml-f16.npz"]


def test_quant_flag_forms():
    assert _recipe("gguf", "m", "--out", "o", "--quant", "F16, q8_0,f16").quant == ["f16", "q8_0"]
    assert _recipe("gguf", "m", "--out", "o", "--quant", "f16", "q8_0").quant == ["f16", "q8_0"]
    assert _recipe("onnx", "m", "--out", "o").select() == (FORMATS["onnx"], ["fp32", "int8", "int4"])
    # As the pipeline's export stage builds it, with a Path for --out.
    from pathlib import Path

    recipe = ExportRecipe(format="gguf", model="m", out=Path("runs/x/"), quant=["q8_0"], allow_mismatch=True)
    assert (recipe.quant, recipe.out, recipe.out_dir) == (["q8_0"], "runs/x", Path("runs/x"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "o", "--threads", "-1"], "--threads: must be 0 (all CPUs) or positive, got -1"),
        (["--out", "o", "--name", " "], "--name: must not be empty"),
        (["--out", "o", "--quant", "f16,q3_x"], "--quant: unknown gguf quantization 'q3_x'; choose from f32, f16, "),
        ([], "--out: expected an output directory"),
    ],
)
def test_flag_errors(argv, message):
    with pytest.raises(EdgeDistillError) as info:
        _recipe("gguf", "m", *argv)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('quant = ["q3_x"]\n', "--quant: unknown gguf quantization 'q3_x'"),
        ("threads = -2\n", "--threads: must be 0 (all CPUs) or positive, got -2"),
        ('threads = "two"\n', "threads: expected a int, got 'two'"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ('format = "onnx"\n', "format: given on the command line (FORMAT MODEL_DIR), not in a config file"),
        ("threads = [\n", "invalid TOML"),
    ],
)
def test_config_file_errors_name_the_file(tmp_path, text, message):
    config = tmp_path / "export.toml"
    config.write_text(text)
    with pytest.raises(EdgeDistillError) as info:
        _recipe("gguf", "m", "--out", "o", "--config", str(config))
    assert str(info.value).startswith(f"{config}") and message in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- parity's outlier allowance
def _judged(thresholds, outliers, positions=200, size=50.0):
    """Judge a candidate equal to the reference but off by ``size`` at ``outliers`` of ``positions`` positions."""
    from edgedistill.export.parity import Reference

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(positions, 16)).astype(np.float32)
    candidate = reference.copy()
    candidate[:outliers, 3] += size  # position by position: one entry far off, the argmax kept
    candidate[:outliers, 3] = np.minimum(candidate[:outliers, 3], reference[:outliers].max(-1) - 1e-3)
    candidate[:outliers, 5] -= size
    return judge(thresholds, Reference([[0] * positions], [reference], []), [candidate], None, 1, 1)


def test_lossy_formats_allow_one_percent_of_positions_over_the_largest_difference():
    lossy = Thresholds.lossy(6.0, 0.6, min_top1=0.9)
    assert lossy.outlier_share == 0.01 and not lossy.greedy_equal
    passed = _judged(lossy, outliers=2)  # 1 % of 200
    assert passed.passed and passed.positions_over_max == 2 and passed.max_logit_diff >= 50
    failed = _judged(lossy, outliers=3)
    assert not failed.passed and failed.positions_over_max == 3
    assert failed.failures == ["max |logit diff| 50 > 6.0 at 3 of 200 positions (at most 2 may be)"]


def test_lossless_formats_allow_no_position_over_the_largest_difference():
    report = _judged(Thresholds(6.0, 0.6, min_top1=0.9, greedy_equal=True), outliers=1)
    assert not report.passed and report.failures == ["max |logit diff| 50 > 6.0"]
