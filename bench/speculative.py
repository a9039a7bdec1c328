"""The teacher accelerated by its students: speculative decoding measured against the teacher alone.

    python -m edgedistill.bench.speculative TEACHER --draft STUDENT [STUDENT ...] [--threads 2]
        [--draft-tokens 1,2,4] [--max-tokens 64] [--repeat 3] [--prompt TEXT ...] [--json OUT]

For each draft and each k (each ``--draft-tokens`` value, and ``auto``: adapted to the acceptance), the teacher
generates greedily from each prompt with the draft proposing, in the same process and on the same loaded teacher
as the runs without a draft, which alternate with them. Reported per row:

* ``decode_tps``: ``(n - 1) / (T(n) - T(1))`` summed over the prompts, where ``T(k)`` is the wall time of one
  whole generation of k tokens from an empty cache, so that the prompt's evaluation (by both models) cancels out;
  the median over ``--repeat`` passes (after one unrecorded pass);
* ``speedup``: that ÷ the teacher's own decode tokens/s, measured the same way in the same passes;
* ``acceptance``: proposed tokens the teacher kept ÷ proposed tokens (``proposed_per_pass``: how many, per pass
  over the prompts); ``accepted_per_round``: kept proposals per
  teacher evaluation; ``tokens_per_round``: tokens generated per teacher evaluation (kept proposals + 1); all
  three over every measured pass;
* ``identical``: whether every prompt's greedy output equals the teacher's alone, token for token;
* ``draft_decode_tps``: the draft's own decode speed alone (what a proposal costs).

Torch-free: only the runtime is imported. The last line of stdout is one JSON document (also written to
``--json``). The bench harness runs this module in a process of its own for ``edgedistill bench --draft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError

# The prompts of the pipeline report's sample generations (plain text, greedy).
DEFAULT_PROMPTS = [
    "The Python standard library",
    "A list comprehension is",
    "To read a file line by line,",
]
DEFAULT_DRAFT_TOKENS = [1, 2, 4]
DEFAULT_MAX_TOKENS = 64
AUTO = "auto"
DEFINITIONS = {
    "decode_tps": "(n - 1) / (T(n) - T(1)) over the prompts, T(k) = wall time of a k-token greedy generation from "
    "an empty cache (prompt evaluation cancels out); median over the passes",
    "speedup": "decode_tps with the draft / the teacher's decode_tps alone, measured in the same passes",
    "acceptance": "proposed tokens the teacher kept / proposed tokens (of how many per pass over the prompts)",
    "tokens_per_round": "tokens generated per teacher evaluation (kept proposals + the teacher's own token)",
    "identical": "every prompt's greedy output equals the teacher's alone, token for token",
    "teacher_check_ms": "ms for the teacher to evaluate n tokens in one call (n - 1 proposals and the token before "
    "them), median of 9, after the first prompt",
}


def _timed(model: Any, ids: list[int], tokens: int) -> tuple[float, Any]:
    from edgedistill.runtime.sampling import SamplingParams

    model.reset_cache()
    started = time.perf_counter()
    stream = model.stream_ids(ids, SamplingParams(max_tokens=tokens, temperature=0.0))
    for _ in stream:
        pass
    return time.perf_counter() - started, stream.completion


def _pass(model: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """One generation of 1 and of ``max_tokens`` tokens per prompt: decode tokens, decode seconds, outputs, stats."""
    tokens = seconds = 0.0
    outputs = []
    drafting = {"rounds": 0, "drafted": 0, "accepted": 0}
    for ids in prompts:
        one, _ = _timed(model, ids, 1)
        many, completion = _timed(model, ids, max_tokens)
        tokens += completion.completion_tokens - 1
        seconds += many - one
        outputs.append(completion.token_ids)
        for key in drafting:
            drafting[key] += (completion.speculative or {}).get(key, 0)
    return {"tokens": tokens, "seconds": seconds, "outputs": outputs, **drafting}


def _rate(passes: list[dict[str, Any]]) -> float | None:
    """The median decode tokens/s of the passes; None when no pass could be timed (too few tokens for the clock)."""
    rates = [p["tokens"] / p["seconds"] for p in passes if p["seconds"] > 0 and p["tokens"] > 0]
    return statistics.median(rates) if rates else None


def _check_costs(teacher: Any, ids: list[int], start: int, ks: list[int | None]) -> dict[str, float]:
    """Milliseconds for the teacher to evaluate n tokens at once after ``ids[:start]`` (median of 9): what a round
    that proposes n - 1 tokens pays for its check, n = 1 being plain decoding."""
    sizes = sorted({1, 2, 3, 5, 8} | {k + 1 for k in ks if k is not None})
    sizes = [n for n in sizes if start + n <= len(ids)]
    teacher.reset_cache()
    teacher.evaluate(ids[:start], 0)
    costs = {}
    for n in sizes:
        times = []
        for _ in range(9):
            started = time.perf_counter()
            teacher.score(ids[start : start + n], start)
            times.append(time.perf_counter() - started)
        costs[str(n)] = 1000 * statistics.median(times)
    teacher.reset_cache()
    return costs


def measure(
    teacher: Path,
    drafts: list[Path],
    labels: list[str] | None = None,
    threads: int = 2,
    draft_tokens: list[int] | None = None,
    prompts: list[str] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    repeat: int = 3,
) -> dict[str, Any]:
    """Measure the teacher alone and with each draft at each k; the result as :func:`main` prints it.

    Raises:
        EdgeDistillError: a model that does not load, or a draft whose vocabulary does not map onto the teacher's.
    """
    from edgedistill.runtime import load
    from edgedistill.runtime.speculative import SpeculativeModel, VocabularyMap

    prompts = list(prompts or DEFAULT_PROMPTS)
    ks: list[int | None] = [*(draft_tokens if draft_tokens is not None else DEFAULT_DRAFT_TOKENS), None]
    labels = labels or [Path(d).stem for d in drafts]
    plain = load(teacher, threads=threads)
    try:
        prompt_ids = [plain.tokenize(p) for p in prompts]
        models: list[tuple[str, Path, int | None, Any]] = [("teacher", Path(teacher), None, plain)]
        loaded = []
        for path, label in zip(drafts, labels):
            draft = load(path, threads=threads)
            loaded.append(draft)
            vocabulary = VocabularyMap(plain, draft)
            for k in ks:
                models.append((label, Path(path), k, SpeculativeModel(plain, draft, k, vocabulary)))
        passes: dict[int, list[dict[str, Any]]] = {index: [] for index in range(len(models))}
        for repetition in range(repeat + 1):  # the first pass is a warm-up
            for index, (_, _, _, model) in enumerate(models):
                result = _pass(model, prompt_ids, max_tokens)
                if repetition:
                    passes[index].append(result)
        check_ms = _check_costs(plain, prompt_ids[0] + passes[0][0]["outputs"][0], len(prompt_ids[0]), ks)
        alone = {}  # each draft's own decode speed, from its own tokens of the prompts
        for label, draft in zip(labels, loaded):
            own = [draft.tokenize(p) for p in prompts]
            alone[label] = _rate([_pass(draft, own, max_tokens) for _ in range(repeat)])
        for draft in loaded:
            draft.close()
    finally:
        plain.close()
    base = _rate(passes[0])
    reference = passes[0][0]["outputs"]
    rows = []
    for index, (label, path, k, _) in enumerate(models[1:], start=1):
        runs = passes[index]
        rate = _rate(runs)
        total = {key: sum(run[key] for run in runs) for key in ("tokens", "rounds", "drafted", "accepted")}
        rows.append(
            {
                "draft": label,
                "path": str(path),
                "draft_tokens": AUTO if k is None else k,
                "decode_tps": rate,
                "teacher_decode_tps": base,
                "speedup": rate / base if base and rate else None,
                "acceptance": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                "proposed_per_pass": total["drafted"] / len(runs),
                "accepted_per_round": total["accepted"] / total["rounds"] if total["rounds"] else 0.0,
                "tokens_per_round": (total["tokens"] + len(runs) * len(prompt_ids)) / total["rounds"]
                if total["rounds"]
                else 0.0,
                "identical": all(run["outputs"] == reference for run in runs),
                "draft_decode_tps": alone[label],
                "spread": max(r["tokens"] / r["seconds"] for r in runs) / min(r["tokens"] / r["seconds"] for r in runs)
                if all(r["seconds"] > 0 and r["tokens"] > 0 for r in runs)
                else None,
            }
        )
    return {
        "teacher": str(teacher),
        "threads": threads,
        "prompts": prompts,
        "max_tokens": max_tokens,
        "repeat": repeat,
        "teacher_decode_tps": base,
        "teacher_check_ms": check_ms,
        "rows": rows,
        "definitions": DEFINITIONS,
    }


def main(argv: list[str] | None = None) -> int:
    from edgedistill.bench.harness import comma_ints, comma_names
    from edgedistill.runtime.speculative import check_draft_tokens

    parser = argparse.ArgumentParser(prog="python -m edgedistill.bench.speculative", description=__doc__.split("\n")[0])
    parser.add_argument("teacher", type=Path, help="the teacher: .gguf, .onnx or ONNX export directory")
    parser.add_argument("--draft", type=Path, nargs="+", required=True, help="draft models (students)")
    parser.add_argument("--labels", type=comma_names, default=None, help="comma-separated names, one per draft")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-tokens", type=comma_ints, default=DEFAULT_DRAFT_TOKENS, help="fixed k values, 1-16")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        for k in args.draft_tokens:
            check_draft_tokens(k)
        if args.labels is not None and len(args.labels) != len(args.draft):
            raise EdgeDistillError(f"--labels: {len(args.labels)} labels for {len(args.draft)} drafts")
        for name, value, low in (
            ("--threads", args.threads, 1),
            ("--max-tokens", args.max_tokens, 2),
            ("--repeat", args.repeat, 1),
        ):
            if value < low:
                raise EdgeDistillError(f"{name}: expected an integer >= {low}, got {value}")
        result = measure(
            args.teacher,
            args.draft,
            args.labels,
            args.threads,
            args.draft_tokens,
            args.prompt,
            args.max_tokens,
            args.repeat,
        )
    except EdgeDistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from edgedistill.bench.report import speculative_markdown

    print(speculative_markdown(result), end="")
    if args.json is not None:
        from edgedistill.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
