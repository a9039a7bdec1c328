"""What the AMX-safe llama.cpp loading costs: prefill and decode speed with and without extra weight buffers.

    python -m edgedistill.bench.llama_buffers MODEL.gguf [MODEL.gguf ...] [--threads 2] [--repeats 3]

``edgedistill/llamacpp.py`` loads GGUF files with ``use_extra_bufts = False`` on CPUs with AMX, where llama.cpp's
AMX buffers segfault. That also gives up the CPU "repack" buffers (weights re-laid out for the AVX2/AVX-512
kernels), so this script measures, on a CPU where the default does *not* crash, each file under both settings:
``on`` (llama.cpp's default) and ``off`` (what AMX machines get). Every measurement runs in a fresh process
(``EDGEDISTILL_LLAMA_EXTRA_BUFFERS`` set for it), the settings alternate, and the table shows medians:

- prefill tokens/s: one 128-token prompt evaluated in one call, logits of the last position only;
- decode tokens/s: 64 greedy single-token steps after it.

Run it on an AMX CPU and ``on`` is refused (it is the crashing configuration). The last line of stdout is one JSON
document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

PROMPT_TOKENS = 128
DECODE_TOKENS = 64


def _child(path: str, threads: int) -> dict[str, Any]:
    import numpy as np

    from edgedistill.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=PROMPT_TOKENS + DECODE_TOKENS + 8, n_batch=PROMPT_TOKENS, threads=threads) as llm:
        text = "The lighthouse keeper wrote in the log every evening, noting the wind and the ships. " * 12
        ids = llm.tokenize(text, add_special=True)[:PROMPT_TOKENS]
        llm.evaluate(ids[:8])  # warm-up: first-call allocations
        started = time.perf_counter()
        logits = llm.evaluate(ids)
        prefill_s = time.perf_counter() - started
        next_id = int(np.argmax(logits))
        started = time.perf_counter()
        for step in range(DECODE_TOKENS):
            next_id = int(np.argmax(llm.evaluate([next_id], start=len(ids) + step)))
        decode_s = time.perf_counter() - started
        return {
            "extra_buffers": llm.extra_buffers,
            "prefill_tps": len(ids) / prefill_s,
            "decode_tps": DECODE_TOKENS / decode_s,
        }


def _measure(path: str, setting: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, EDGEDISTILL_LLAMA_EXTRA_BUFFERS=setting)
    command = [sys.executable, "-m", "edgedistill.bench.llama_buffers", "--child", path, "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(path: str, setting: str, threads: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one file and setting that did not fail (else the first failure)."""
    good = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {"model": os.path.basename(path), "extra_buffers": setting, "threads": threads}
    if good:
        row["prefill_tps"] = round(statistics.median(r["prefill_tps"] for r in good), 1)
        row["decode_tps"] = round(statistics.median(r["decode_tps"] for r in good), 1)
        row["decode_tps_runs"] = [round(r["decode_tps"], 1) for r in good]
    else:
        row["error"] = runs[0]["error"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help=".gguf files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.models[0], args.threads)))
        return 0

    import llama_cpp

    from edgedistill.bench.env import cpu_model
    from edgedistill.llamacpp import AMX_FLAGS, build_has_amx
    from edgedistill.system import cpu_flags

    amx = build_has_amx(llama_cpp) or bool(AMX_FLAGS & cpu_flags())
    settings = ["off"] if amx else ["on", "off"]
    cpu = cpu_model()
    rows = []
    print(f"CPU: {cpu}; AMX: {'yes' if amx else 'no'}; threads {args.threads}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<34} {'buffers':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for path in args.models:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
        for _ in range(args.repeats):
            for setting in settings:
                runs[setting].append(_measure(path, setting, args.threads))
        for setting in settings:
            row = _row(path, setting, args.threads, runs[setting])
            rows.append(row)
            print(
                f"{row['model']:<34} {setting:>8} {row.get('prefill_tps', float('nan')):>14.1f} "
                f"{row.get('decode_tps', float('nan')):>13.1f}"
            )
    print(json.dumps({"cpu": cpu, "amx": amx, "load_average": os.getloadavg()[0], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
