"""``edgedistill bench MODEL... --threads 1,2,4 --prompt-tokens 128 --gen-tokens 128 --repeat 5 --warmup 1 --out DIR``

Registered in ``edgedistill/cli.py``; imports only the torch-free harness (torch is imported in a measuring
process, and only for a checkpoint directory). The flags come from :class:`~edgedistill.bench.harness.BenchConfig`
(``--config FILE`` reads the same settings from TOML or JSON; flags win). Prints the human table, then one compact
JSON line.
"""

from __future__ import annotations

import argparse
import json

from edgedistill.errors import EdgeDistillError


def add_args(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`~edgedistill.bench.harness.BenchConfig` (``--config FILE`` too), and ``--no-progress``."""
    from edgedistill.bench.harness import BenchConfig

    BenchConfig.add_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgedistill.bench.harness import BenchConfig, run_bench
    from edgedistill.bench.report import text_table

    if not args.models and args.teacher is None and args.config is None:
        raise EdgeDistillError("bench: give at least one MODEL (.gguf, .onnx, ONNX or checkpoint directory)")
    config = BenchConfig.from_args(args)
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
