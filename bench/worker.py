"""One measurement in a fresh process: ``python -m edgedistill.bench.worker SPEC.json``.

The harness starts one per (model, thread count), so that one model's memory never shows in the next one's peak
and every load is a cold start of the process. The worker:

1. pins itself to the CPUs the spec names (a target profile's cores), imports the backend's library, and records
   the RSS before loading (so the library's own footprint is not charged to the model);
2. samples RSS from a background thread while it loads the model and runs ``warmup + repeat`` repetitions;
3. each repetition starts from an empty cache: the prompt is evaluated in one call (prefill), the next token is
   chosen greedily (argmax) - together the time to first token - and then ``gen_tokens - 1`` single-token steps
   are timed one by one; end-of-sequence tokens are ignored so that every repetition decodes the same count;
4. with the sampler stopped, optionally scores held-out windows through the model's logits (quality);
5. writes one JSON result to the path in the spec. Progress goes to stdout as lines starting with ``@@bench``;
   anything else a native library prints there is ignored by the harness.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from edgedistill.bench.stats import summarize_runs
from edgedistill.deps import require

MARKER = "@@bench "
# A plain English prompt, repeated until it is long enough: its tokens matter little for speed, but real text keeps
# the tokenizer's path and the attention pattern ordinary.
PROMPT_TEXT = (
    "The history of the lighthouse keeper's island began long before the first lamp was lit. Fishermen told of "
    "storms that arrived without warning, of ships that vanished in the fog, and of a village that grew around the "
    "harbour as trade moved along the coast. "
)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(event) + "\n")
    sys.stdout.flush()


def prompt_ids(tokenize: Any, count: int, vocab: int) -> list[int]:
    """Exactly ``count`` token ids of real text (the prompt text repeated as needed)."""
    ids: list[int] = []
    first = True
    while len(ids) < count:
        part = [int(i) for i in tokenize(PROMPT_TEXT, first) if 0 <= int(i) < vocab]
        if not part:
            part = list(range(min(vocab, 16)))
        ids.extend(part)
        first = False
    return ids[:count]


def _import_backend(kind: str) -> None:
    """Import the backend's library before the RSS baseline, so that its code is not counted as model memory."""
    import numpy  # noqa: F401

    if kind == "gguf":
        require("llama_cpp")
    elif kind == "onnx":
        require("onnxruntime")
        try:
            import onnx  # noqa: F401  (the ONNX backend rewrites the graph with it)
        except ImportError:
            pass
    else:
        require("torch")
        require("transformers")


def _load(kind: str, path: str, threads: int, context: int) -> Any:
    if kind == "torch":
        from edgedistill.bench.torch_backend import TorchModel

        return TorchModel(Path(path), threads=threads, context=context)
    from edgedistill.runtime import load

    return load(path, threads=threads, context=context)


def _load_mode(kind: str, model: Any) -> str:
    if kind == "gguf":
        mmap = bool(getattr(getattr(model, "llama", None), "uses_mmap", True))
        return "mmap (llama.cpp; pages are read on first use)" if mmap else "read into memory (llama.cpp, no mmap)"
    if kind == "onnx":
        engine = type(getattr(model, "engine", None)).__name__
        return f"read into memory (onnxruntime session, {engine})"
    return "read into memory (transformers, float32)"


def _repetition(model: Any, ids: list[int], gen_tokens: int) -> dict[str, Any]:
    import numpy as np

    model.reset_cache()
    started = time.perf_counter()
    logits = model.evaluate(ids, 0)
    evaluated = time.perf_counter()
    token = int(np.argmax(logits))
    first = time.perf_counter()
    steps = []
    position = len(ids)
    for _ in range(gen_tokens - 1):
        step = time.perf_counter()
        logits = model.evaluate([token], position)
        token = int(np.argmax(logits))
        steps.append(time.perf_counter() - step)
        position += 1
    model.reset_cache()
    return {"prefill_s": evaluated - started, "ttft_s": first - started, "prompt_tokens": len(ids), "step_s": steps}


def _quality(model: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from edgedistill.bench.quality import agreement, evaluate, token_windows

    quality = spec["quality"]
    texts = json.loads(Path(quality["texts"]).read_text(encoding="utf-8"))
    window = min(int(quality["window"]), model.context)
    windows = token_windows(lambda text: model.tokenize(text, True), texts, int(quality["max_tokens"]), window)
    started = time.perf_counter()
    # bits per byte where the model knows its tokens' bytes (the runtime's backends; not the PyTorch reference)
    scores = evaluate(model.logits, windows, getattr(model, "token_bytes", None))
    out: dict[str, Any] = {
        "perplexity": scores["perplexity"],
        "nll": scores["nll"],
        "tokens": scores["tokens"],
        "top1_accuracy": scores["top1_accuracy"],
        "windows": len(windows),
        "window": window,
        "seconds": time.perf_counter() - started,
    }
    if "bits_per_byte" in scores:
        out["bits_per_byte"], out["bytes"] = scores["bits_per_byte"], scores["bytes"]
    ids = np.concatenate([np.asarray(w, dtype=np.int64) for w in windows])
    if quality.get("save"):
        np.savez(quality["save"], ids=ids, argmax=scores["argmax"], window=window)
    reference = quality.get("reference")
    if reference:
        with np.load(reference) as teacher:
            same = int(teacher["window"]) == window and np.array_equal(teacher["ids"], ids)
            if same:
                out["agreement"] = agreement(scores["argmax"], teacher["argmax"])
            else:
                out["agreement_note"] = "not measured: the teacher tokenizes the held-out text differently"
    return out


def _llama_perf(model: Any, reset: bool = False) -> dict[str, Any] | None:
    """llama.cpp's own timing of the measured repetitions (``llama_perf_context``): prompt batches and single-token
    decodes as its context counted them, without Python, sampling or our loop. None where the binding lacks it."""
    context = getattr(getattr(model, "llama", None), "ctx", None)  # the GGUF backend's llama.cpp context
    if context is None:
        return None
    import llama_cpp

    if not hasattr(llama_cpp, "llama_perf_context"):
        return None
    if reset:
        llama_cpp.llama_perf_context_reset(context)
        return None
    data = llama_cpp.llama_perf_context(context)
    return {
        "prompt_tokens": int(data.n_p_eval),
        "prompt_ms": float(data.t_p_eval_ms),
        "decode_tokens": int(data.n_eval),
        "decode_ms": float(data.t_eval_ms),
        "prefill_tps": data.n_p_eval / data.t_p_eval_ms * 1e3 if data.t_p_eval_ms > 0 else None,
        "decode_tps": data.n_eval / data.t_eval_ms * 1e3 if data.t_eval_ms > 0 else None,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model with the RSS sampler running, time the repetitions, then score quality (steps 1-4 above)."""
    from edgedistill.bench.rss import RssSampler, kernel_peak_rss

    cpus = spec.get("cpus")
    if cpus:
        os.sched_setaffinity(0, cpus)
    kind = spec["kind"]
    load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    _import_backend(kind)
    gc.collect()
    sampler = RssSampler().start()
    started = time.perf_counter()
    model = _load(kind, spec["path"], spec["threads"], spec["context"])
    load_s = time.perf_counter() - started
    sampler.sample_now()
    rss_loaded = sampler.sample_now()
    runs = _repetitions(model, kind, spec, sampler)
    sampler.stop()
    llama_perf = _llama_perf(model) if kind == "gguf" else None
    kernel_peak = kernel_peak_rss()
    out = {
        "info": model.info.to_dict(),
        "load_s": load_s,
        "load_mode": _load_mode(kind, model),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "load_average": [round(v, 2) for v in load_average],
        "rss_after_load_mb": rss_loaded / 1e6,
        **_memory(sampler, kernel_peak),
        **_timings(runs),
    }
    if llama_perf:
        out["llama_perf"] = llama_perf
    if spec.get("quality"):
        emit({"event": "quality"})
        out["quality"] = _quality(model, spec)
    model.close()
    return out


def _repetitions(model: Any, kind: str, spec: dict[str, Any], sampler: Any) -> list[dict[str, Any]]:
    """``warmup + repeat`` repetitions of the same prompt, a progress event after each; the measured ones."""
    ids = prompt_ids(model.tokenize, spec["prompt_tokens"], model.info.vocab_size)
    runs = []
    for index in range(spec["warmup"] + spec["repeat"]):
        measured = index >= spec["warmup"]
        if index == spec["warmup"] and kind == "gguf":
            _llama_perf(model, reset=True)
        result = _repetition(model, ids, spec["gen_tokens"])
        sampler.sample_now()
        if measured:
            runs.append(result)
        steps = result["step_s"]
        emit(
            {
                "event": "rep",
                "index": index,
                "warmup": not measured,
                "decode_tps": len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0,
            }
        )
    return runs


def _memory(sampler: Any, kernel_peak: int | None) -> dict[str, Any]:
    """The sampled RSS (baseline, peak, rate) and the kernel's high-water mark; the peak reported is the higher.

    The kernel's mark cannot miss a short peak; the sampler can, while native code holds the GIL (the ONNX
    backend's graph rewrite at load does)."""
    return {
        "kernel_peak_rss_mb": kernel_peak / 1e6 if kernel_peak else None,
        **sampler.to_dict(),
        "sampled_peak_rss_mb": sampler.peak / 1e6,
        "peak_rss_mb": max(sampler.peak, kernel_peak or 0) / 1e6,
        "peak_source": "sampled" if sampler.peak >= (kernel_peak or 0) else "kernel high-water mark (VmHWM)",
    }


def _timings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The statistics over the measured repetitions, and each repetition's totals."""
    return {
        **summarize_runs(runs),
        "runs": [
            {
                "prefill_s": r["prefill_s"],
                "ttft_s": r["ttft_s"],
                "decode_s": sum(r["step_s"]),
                "decode_steps": len(r["step_s"]),
            }
            for r in runs
        ],
    }


def main(argv: list[str]) -> int:
    from edgedistill.errors import EdgeDistillError

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result_path = Path(spec["result"])
    try:
        result = run(spec)
    except EdgeDistillError as err:
        result_path.write_text(json.dumps({"error": str(err)}), encoding="utf-8")
        return 2
    except Exception as err:  # noqa: BLE001 - the harness reports it with the traceback from stderr
        traceback.print_exc()
        result_path.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}), encoding="utf-8")
        return 1
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
