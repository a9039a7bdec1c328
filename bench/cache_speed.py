"""Teacher cache vs online distillation: cache build speed per backend, student step time and peak memory.

    python -m edgedistill.bench.cache_speed --cache runs/cache64 --student tiny

1. Cache build throughput (tokens/s) of each teacher backend (torch, llama.cpp) on the first ``--build-rows``
   packed sequences of the data, written to a temporary directory.
2. ``edgedistill distill`` run for ``--steps`` steps twice in a child process — from ``--cache`` (which must have
   been built by ``edgedistill teacher-cache`` over the same data and ``--seq-len``) and with the teacher online —
   reporting the median seconds per step after ``--skip`` warm-up steps (from ``metrics.jsonl``) and the child's
   peak RSS, sampled every 20 ms with psutil.

The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgedistill.bench.rss import run_with_peak_rss


def build_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of each backend over the first ``build_rows`` sequences (not written anywhere permanent)."""
    import torch

    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.cache import CacheManifest, build_cache, llama_cpp_topk, torch_topk
    from edgedistill.distill.data import PackedData, load_data
    from edgedistill.distill.heads import resolve_dtype

    torch.set_num_threads(args.threads)
    source = teachers.resolve_teacher(args.teacher)
    tokenizer = teachers.load_tokenizer(source)
    train, _, _ = load_data(args.data, tokenizer, args.seq_len)
    subset = PackedData(train.ids[: args.build_rows], train.weights[: args.build_rows])
    vocab = len(tokenizer)
    results = {}
    for backend in args.backends:
        if backend == "torch":
            dtype = resolve_dtype(args.teacher_dtype, torch.device("cpu"))
            topk = torch_topk(teachers.load_model(source, dtype), args.top_k, vocab)
            label = f"torch ({str(dtype).removeprefix('torch.')})"
        else:
            topk = llama_cpp_topk(source.path, args.top_k, vocab, args.seq_len, args.threads)
            label = "llama.cpp (the GGUF as is)"
        with tempfile.TemporaryDirectory() as tmp:
            manifest = CacheManifest(
                teacher={"spec": args.teacher},
                backend=backend,
                tokenizer_sha256="-",
                data_sha256="-",
                data_files=[],
                seq_len=args.seq_len,
                top_k=args.top_k,
                vocab_size=vocab,
                rows_per_shard=args.build_rows,
                splits={"train": len(subset.ids)},
            )
            topk(subset.ids[:1, :-1], subset.ids[:1, 1:])  # warm-up: first-call allocations and kernel selection
            done = build_cache(Path(tmp), manifest, {"train": subset}, topk, batch_size=8, progress=False)
        results[backend] = {"label": label, "tokens": done.tokens, "tokens_per_second": done.tokens_per_second}
        del topk
    return results


def step_speed(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    common = [
        "--student",
        args.student,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--threads",
        str(args.threads),
        "--save-every",
        str(args.steps),
        "--eval-tokens",
        "256",
        "--precision",
        args.precision,
    ]
    if args.data:
        common += ["--data", *args.data]
    runs = {
        "cache": ["--teacher-cache", args.cache],
        "online": ["--teacher", args.teacher, "--teacher-dtype", args.teacher_dtype],
    }
    for name, extra in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            command = [sys.executable, "-m", "edgedistill", "distill", *common, *extra, "--out", str(out)]
            code, peak, stderr = run_with_peak_rss(command)
            if code:
                print(stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{name} run failed with exit code {code}")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in rows[args.skip :]]
        results[name] = {
            "median_seconds_per_step": statistics.median(seconds),
            "peak_rss_mb": peak,
            "steps_timed": len(seconds),
        }
    results["speedup"] = results["online"]["median_seconds_per_step"] / results["cache"]["median_seconds_per_step"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--cache", help="a cache built over the same data and --seq-len (step comparison)")
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--data", nargs="*", default=[])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--build-rows", type=int, default=16, help="sequences per backend for the build speed")
    parser.add_argument("--backends", nargs="*", default=["torch", "llama.cpp"])
    parser.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the online teacher's dtype (and the torch backend's)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the student's compute type (distill --precision)",
    )
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "threads": args.threads,
        "batch": f"{args.batch_size}x{args.seq_len}",
        "student": args.student,
        "teacher": args.teacher,
        "top_k": args.top_k,
        "precision": args.precision,
        "teacher_dtype": args.teacher_dtype,
    }
    if args.backends:
        result["build"] = build_speed(args)
        for backend, row in result["build"].items():
            print(f"cache build, {row['label']:<28} {row['tokens_per_second']:8.0f} tokens/s ({row['tokens']} tokens)")
    if args.cache:
        result["steps"] = step_speed(args)
        for name in ("cache", "online"):
            row = result["steps"][name]
            print(
                f"student step, {name:<7} {row['median_seconds_per_step']:.3f} s/step (median of "
                f"{row['steps_timed']}), peak RSS {row['peak_rss_mb']:.0f} MB"
            )
        print(f"from the cache: {result['steps']['speedup']:.2f}x faster per step")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
