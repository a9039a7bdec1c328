"""Runtime decode speed: our backends against the libraries' own generation loops, same file, same threads.

    python -m edgedistill.bench.runtime_speed MODEL [MODEL ...] [--threads 2] [--tokens 128] [--repeats 3]

For a ``.gguf`` file our GGUF backend (llama.cpp logits, our sampler) runs against llama-cpp-python's
``Llama.create_completion`` (llama.cpp's own sampler) on a second ``Llama`` built with the same arguments. For an
ONNX export (a directory or its ``model.onnx``) our ONNX backend runs against optimum's
``ORTModelForCausalLM.generate`` on a session with the same thread count. Every run is greedy from the same
prompt token ids.

Decode tokens/s is measured the same way for all three, from the outside: ``(n - 1) / (T(n) - T(1))``, where
``T(k)`` is the wall time of one whole call that generates ``k`` tokens (prompt evaluation, sampling and
detokenization included, so prefill cancels out). Runs alternate between ours and the baseline; the table shows
the median of ``--repeats`` and the spread (max/min). The machine's load average is recorded before and after,
since a busy CPU makes numbers meaningless. The last line of stdout is one JSON document.

The baselines need optimum-onnx, transformers and torch (ONNX) or llama-cpp-python (GGUF); ours needs neither torch
nor transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgedistill.bench.env import load_average

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea, there lived"
# Targets from the runtime issue: our GGUF decode at least 0.95x llama.cpp's own loop, our ONNX decode at least
# 3x optimum's on a tiny student and no slower on the teacher.
GGUF_TARGET = 0.95


def decode_rate(run: Callable[[int], int], tokens: int) -> tuple[float, int]:
    """``(n - 1) / (T(n) - T(1))`` for one pair of calls; ``run(k)`` generates up to ``k`` tokens, returns how many."""
    started = time.perf_counter()
    run(1)
    one = time.perf_counter() - started
    started = time.perf_counter()
    generated = run(tokens)
    many = time.perf_counter() - started
    if generated < 2 or many <= one:
        return 0.0, generated
    return (generated - 1) / (many - one), generated


def _ours(model: Any, prompt_ids: list[int]) -> Callable[[int], int]:
    from edgedistill.runtime.sampling import SamplingParams

    def run(tokens: int) -> int:
        stream = model.stream_ids(prompt_ids, SamplingParams(max_tokens=tokens, temperature=0.0))
        for _ in stream:
            pass
        return stream.completion.completion_tokens

    return run


def _llama_cpp_baseline(model: Any, prompt_ids: list[int]) -> tuple[Callable[[int], int], Any]:
    import llama_cpp

    from edgedistill.errors import EdgeDistillError

    if not model.llama.extra_buffers:
        # llama_cpp.Llama always loads with extra buffers, which crash on this CPU (edgedistill/llamacpp.py).
        raise EdgeDistillError(
            f"{model.info.path}: llama-cpp-python's Llama cannot turn off the AMX/repack weight buffers that crash "
            "on this CPU, so its own loop cannot be measured here"
        )
    loaded = model.llama  # the same settings in llama-cpp-python's high-level Llama
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if loaded.f32_cache else {}
    llama = llama_cpp.Llama(
        model_path=str(loaded.path),
        n_ctx=loaded.n_ctx,
        n_batch=loaded.n_batch,
        n_ubatch=loaded.n_batch,
        n_threads=loaded.threads,
        n_threads_batch=loaded.threads,
        n_gpu_layers=0,
        flash_attn=loaded.flash_attn,
        verbose=False,
        **cache,
    )

    def run(tokens: int) -> int:
        response = llama.create_completion(prompt_ids, max_tokens=tokens, temperature=0.0)
        return int(response["usage"]["completion_tokens"])

    return run, llama


def _optimum_baseline(model: Any, prompt_ids: list[int], threads: int) -> tuple[Callable[[int], int], Any]:
    import onnxruntime
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    directory = Path(model.info.path).parent
    baseline = ORTModelForCausalLM.from_pretrained(
        directory, session_options=options, provider="CPUExecutionProvider", use_cache=True
    )
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    attention = torch.ones_like(input_ids)
    torch.set_num_threads(threads)

    def run(tokens: int) -> int:
        output = baseline.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=next(iter(model.eos_ids), 0),
        )
        return int(output.shape[1] - input_ids.shape[1])

    return run, baseline


def measure(path: str, threads: int, tokens: int, repeats: int, prompt: str) -> dict[str, Any]:
    """Our backend and the library's own loop on one model file; medians of ``repeats`` alternating runs."""
    from edgedistill.runtime import load

    model = load(path, threads=threads, context=max(512, tokens + 64 + len(prompt)))
    prompt_ids = model.tokenize(prompt)
    ours = _ours(model, prompt_ids)
    if model.info.format == "gguf":
        baseline_name = "llama-cpp-python create_completion"
        baseline, handle = _llama_cpp_baseline(model, prompt_ids)
    else:
        baseline_name = "optimum ORTModelForCausalLM.generate"
        baseline, handle = _optimum_baseline(model, prompt_ids, threads)
    for run in (ours, baseline):  # warm-up: first-call allocations, page faults of the weights
        run(8)
    ours_rates, baseline_rates, ours_counts, baseline_counts = [], [], [], []
    for _ in range(repeats):
        rate, count = decode_rate(ours, tokens)
        ours_rates.append(rate)
        ours_counts.append(count)
        rate, count = decode_rate(baseline, tokens)
        baseline_rates.append(rate)
        baseline_counts.append(count)
    del handle
    info = model.info
    model.close()
    ours_tps = statistics.median(ours_rates)
    baseline_tps = statistics.median(baseline_rates)
    return {
        "model": str(path),
        "format": info.format,
        "quantization": info.quantization,
        "parameters": info.parameters,
        "file_mb": round(info.file_bytes / 1e6, 2),
        "ours": f"edgedistill {info.backend} backend",
        "ours_tps": round(ours_tps, 1),
        "baseline": baseline_name,
        "baseline_tps": round(baseline_tps, 1),
        "ratio": round(ours_tps / baseline_tps, 3) if baseline_tps else None,
        "ours_spread": round(max(ours_rates) / min(ours_rates), 3) if min(ours_rates) > 0 else None,
        "baseline_spread": round(max(baseline_rates) / min(baseline_rates), 3) if min(baseline_rates) > 0 else None,
        "ours_runs": [round(r, 1) for r in ours_rates],
        "baseline_runs": [round(r, 1) for r in baseline_rates],
        "ours_tokens": min(ours_counts),
        "baseline_tokens": min(baseline_counts),
        "prompt_tokens": len(prompt_ids),
    }


def print_table(results: list[dict[str, Any]], threads: int) -> None:
    header = f"{'model':44} {'quant':6} {'ours tok/s':>10} {'baseline tok/s':>14} {'ratio':>6} {'spread':>13}  baseline"
    print(header)
    for r in results:
        spread = f"{r['ours_spread'] or 0:.2f}/{r['baseline_spread'] or 0:.2f}"
        print(
            f"{Path(r['model']).name[-44:]:44} {r['quantization']:6} {r['ours_tps']:10.1f} {r['baseline_tps']:14.1f} "
            f"{r['ratio'] or 0:6.2f} {spread:>13}  {r['baseline']}"
        )
        if r["ours_tokens"] != r["baseline_tokens"]:
            print(f"  note: generated {r['ours_tokens']} (ours) vs {r['baseline_tokens']} (baseline) tokens")
    print(f"({threads} threads; decode tokens/s = (n-1)/(T(n)-T(1)); spread = max/min over runs, ours/baseline)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help=".gguf files, ONNX export directories or .onnx")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per engine (default 3)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (plain text)")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("--tokens must be >= 2, --repeats and --threads >= 1")
    load_before = load_average()
    from edgedistill.errors import EdgeDistillError

    try:
        results = [measure(path, args.threads, args.tokens, args.repeats, args.prompt) for path in args.models]
    except EdgeDistillError as err:
        print(f"runtime_speed: error: {err}", file=sys.stderr)
        return 2
    load_after = load_average()
    print_table(results, args.threads)
    print(f"load average before {load_before}, after {load_after} ({os.cpu_count()} CPUs)")
    print(
        json.dumps(
            {
                "bench": "runtime_speed",
                "threads": args.threads,
                "new_tokens": args.tokens,
                "repeats": args.repeats,
                "load_before": load_before,
                "load_after": load_after,
                "results": results,
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
