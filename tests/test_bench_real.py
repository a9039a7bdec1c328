"""A short real bench of the tiny student's GGUF, ONNX and PyTorch checkpoint; the CLI; the torch-free import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from conftest import write_jsonl
from runtime_helpers import REPO, tiny_exports

from edgedistill.bench.harness import BenchConfig, run_bench
from edgedistill.bench.report import read_json
from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError

HEAVY = ("torch", "transformers", "onnxruntime", "llama_cpp", "onnx", "matplotlib")


def test_bench_modules_import_no_heavy_library():
    code = textwrap.dedent(
        """
        import json, sys
        import edgedistill.bench.harness, edgedistill.bench.cli, edgedistill.bench.claims, edgedistill.bench.report
        import edgedistill.bench.worker, edgedistill.bench.artifacts, edgedistill.bench.env
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, ",".join(HEAVY)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_short_real_bench_of_tiny_gguf_onnx_and_checkpoint(tmp_path):
    exports = tiny_exports()
    data = write_jsonl(
        tmp_path / "heldout.jsonl", [{"text": f"The quick brown fox number {i} jumps."} for i in range(30)]
    )
    config = BenchConfig(
        models=[exports.onnx_dir, exports.checkpoint],
        labels=["onnx", "torch"],
        teacher=exports.gguf,
        threads=[1],
        prompt_tokens=16,
        gen_tokens=9,
        repeat=2,
        warmup=1,
        data=[data],
        quality_tokens=120,
        quality_window=40,
        target="rpi5",
        claims=True,
        out=tmp_path / "out",
        draft=[exports.onnx_dir],  # the teacher's own weights as its draft: every proposal kept
        draft_tokens=[2],
    )
    result = run_bench(config, progress=False)
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "onnx", "torch"]
    assert [rows[k]["backend"] for k in rows] == ["llama.cpp", "onnxruntime", "pytorch"]
    for row in rows.values():
        assert row["decode_tps"]["n"] == 2 and row["decode_tps"]["mean"] > 0 and row["decode_steps"] == 2 * 8
        assert 0 < row["ttft_ms"]["mean"] and row["prefill_tps"]["mean"] > 0
        assert row["token_ms_p50"] <= row["token_ms_p95"]
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0 and row["rss_rate_hz"] >= 100
        assert row["parameters"] > 0 and row["file_bytes"] > 0 and row["bytes_per_token"] > 0
        assert row["load_s"] > 0 and row["cpus"] and len(row["cpus"]) <= 4
        assert row["bound_tps"] > 0 and row["fits_in_host_cache"] in (True, False)
        assert row["projection"]["label"] == "projection" and row["projection"]["target"] == "rpi5"
        assert row["quality"]["tokens"] > 0
    # One set of weights in three formats: the same perplexity, through each runtime's own logits.
    ppl = [rows[k]["quality"]["perplexity"] for k in rows]
    assert max(ppl) / min(ppl) < 1.01, ppl
    # bits per byte where the runtime knows each token's bytes: the same bytes in both formats, the same figure
    gguf, onnx = rows["teacher"]["quality"], rows["onnx"]["quality"]
    assert gguf["bytes"] == onnx["bytes"] > 0 and gguf["bits_per_byte"] == pytest.approx(onnx["bits_per_byte"], 0.01)
    assert gguf["bits_per_byte"] == pytest.approx(gguf["nll"] * gguf["tokens"] / math.log(2) / gguf["bytes"])
    assert "bits_per_byte" not in rows["torch"]["quality"]  # the PyTorch reference has no byte map
    assert rows["teacher"]["load_mode"].startswith("mmap")
    perf = rows["teacher"]["llama_perf"]  # llama.cpp's own counters over the measured repetitions
    assert perf["decode_tokens"] == 2 * 8 and perf["prompt_tokens"] == 2 * 16 and perf["decode_tps"] > 0
    assert 0 < perf["decode_ratio"] <= 1.05 and "llama_perf" not in rows["onnx"]
    assert result["environment"]["bandwidth_gbs"]["1"] > 0
    claims = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert claims["speed-up 1/8"] == "not measured"  # every model here is the teacher's size
    # speculative decoding: the teacher (GGUF) drafted by the same weights in ONNX, k = 2 and adaptive (which may
    # leave a draft as costly as the teacher idle, so only k = 2 is sure to keep about 3 tokens per check)
    spec = result["speculative"]
    checks = spec["teacher_check_ms"]
    assert {"1", "2", "3"} <= set(checks) and all(ms > 0 for ms in checks.values())
    drafted = spec["rows"]
    assert [(r["draft"], r["draft_tokens"]) for r in drafted] == [("tiny-student-onnx-fp32", k) for k in (2, "auto")]
    assert drafted[0]["tokens_per_round"] > 2
    for row in drafted:
        assert row["identical"] and row["acceptance"] == 1.0
        assert row["decode_tps"] > 0 and row["teacher_decode_tps"] == spec["teacher_decode_tps"] > 0
        assert row["speedup"] == pytest.approx(row["decode_tps"] / row["teacher_decode_tps"])
    saved = read_json(tmp_path / "out" / "bench.json")
    assert [r["label"] for r in saved["rows"]] == list(rows)
    assert "The teacher accelerated by its drafts" in (tmp_path / "out" / "bench.md").read_text()
    assert (tmp_path / "out" / "bench.csv").is_file() and (tmp_path / "out" / "decode_vs_size.png").is_file()


@pytest.mark.slow
def test_cli_prints_the_table_and_a_json_line(tmp_path, capsys):
    exports = tiny_exports()
    out = tmp_path / "cli"
    argv = ["bench", str(exports.gguf), "--threads", "1", "--prompt-tokens", "8", "--gen-tokens", "4"]
    code = main([*argv, "--repeat", "1", "--warmup", "0", "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "decode tok/s" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"][0]["label"] == "tiny-student-f32" and summary["rows"][0]["decode_tps"] > 0
    assert (out / "bench.md").is_file()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.gguf"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.gguf" in err and "Traceback" not in err
    assert main(["bench", str(tmp_path), "--target", "pi9", "--out", str(tmp_path)]) == 2
    assert "pi9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's one-line usage error
        main(["bench", "x.gguf", "--threads", "0,a"])
    assert stop.value.code == 2


def test_config_is_validated():
    with pytest.raises(EdgeDistillError, match="labels"):
        BenchConfig(models=["a.gguf"], labels=["a", "b"])
    with pytest.raises(EdgeDistillError, match="gen_tokens"):
        BenchConfig(models=["a.gguf"], gen_tokens=1)
    with pytest.raises(EdgeDistillError, match="threads"):
        BenchConfig(models=["a.gguf"], threads=[0])
    with pytest.raises(EdgeDistillError, match="^draft: .*--teacher"):
        BenchConfig(models=["a.gguf"], draft=["b.gguf"])
    for bad in ([0], [17], [], ["2"], [True]):
        with pytest.raises(EdgeDistillError, match="^draft_tokens: "):
            BenchConfig(models=["a.gguf"], teacher="t.gguf", draft=["b.gguf"], draft_tokens=bad)
