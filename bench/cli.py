"""``edgedistill bench MODEL... --threads 1,2,4 --prompt-tokens 128 --gen-tokens 128 --repeat 5 --warmup 1 --out DIR``

Registered in ``edgedistill/cli.py``; imports only the torch-free harness (torch is imported in a measuring
process, and only for a checkpoint directory). Prints the human table, then one compact JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgedistill.errors import EdgeDistillError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.bench.targets import TARGET_NAMES

    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        type=Path,
        help=".gguf file, .onnx file or ONNX export directory, or a checkpoint directory (PyTorch)",
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=None,
        help="comma-separated thread counts, each measured separately (default: every CPU here)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: 128)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per repetition (default: 128)")
    parser.add_argument("--repeat", type=int, default=5, help="measured repetitions (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded repetitions first (default: 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        help="directory for bench.json, bench.csv, bench.md and the plots (default: bench-out)",
    )
    parser.add_argument("--labels", default=None, help="comma-separated display names, one per MODEL")
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help='held-out .jsonl ({"text": ...}) or .txt files: adds perplexity through the runtime',
    )
    parser.add_argument("--quality-tokens", type=int, default=4096, help="held-out tokens scored (default: 4096)")
    parser.add_argument("--quality-window", type=int, default=256, help="tokens per scored window (default: 256)")
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="the teacher artifact: benchmarked too; reference of agreement, retention and claims",
    )
    parser.add_argument(
        "--target",
        default=None,
        metavar="NAME",
        help=f"{', '.join(TARGET_NAMES)} or a profile .toml: limits threads/affinity to its cores "
        "and adds projected decode speed (labelled projection)",
    )
    parser.add_argument("--claims", action="store_true", help="check the seed's speed/memory/retention claims")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgedistill.bench.env import available_cpus
    from edgedistill.bench.harness import BenchConfig, run_bench
    from edgedistill.bench.report import text_table

    labels = [part.strip() for part in args.labels.split(",")] if args.labels else None
    if not args.models and args.teacher is None:
        raise EdgeDistillError("bench: give at least one MODEL (.gguf, .onnx, ONNX or checkpoint directory)")
    config = BenchConfig(
        models=list(args.models),
        labels=labels,
        threads=args.threads or [len(available_cpus())],
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeat=args.repeat,
        warmup=args.warmup,
        data=list(args.data),
        quality_tokens=args.quality_tokens,
        quality_window=args.quality_window,
        teacher=args.teacher,
        target=args.target,
        claims=args.claims,
        out=args.out,
    )
    result = run_bench(config, progress=not args.no_progress)
    print(text_table(result), end="")
    print(f"reports written to {config.out}/ (bench.json, bench.csv, bench.md, plots)")
    summary = {
        "out": str(config.out),
        "rows": [
            {
                "label": r["label"],
                "threads": r["threads"],
                "decode_tps": r["decode_tps"]["mean"],
                "peak_rss_mb": r["peak_rss_mb"],
                **({"projection_decode_tps": r["projection"]["decode_tps"]} if r.get("projection") else {}),
            }
            for r in result["rows"]
        ],
        "claims": [{"claim": c["claim"], "verdict": c["verdict"]} for c in result["claims"] or []],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0
