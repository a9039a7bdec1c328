"""``edgedistill export gguf|onnx MODEL_DIR --quant ... --out DIR``: the two functions the CLI registers.

:func:`add_args` declares the flags; :func:`run` checks the input, loads the model once, computes the PyTorch
reference, exports and checks every artifact, publishes them with ``DIR/manifest.json``, prints a table and, as the
last line of stdout, one compact JSON document. Heavy libraries are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgedistill._deps import require
from edgedistill.export.manifest import ArtifactRecord, StagedArtifact, publish_with_manifest
from edgedistill.export.recipe import FORMATS, ExportRecipe
from edgedistill.files import claim

if TYPE_CHECKING:
    from edgedistill.export.source import ExportSource

# Modules each format needs beyond torch and transformers, checked before the model loads.
FORMAT_MODULES = {"gguf": ("gguf", "llama_cpp"), "onnx": ("optimum", "onnxruntime", "onnx", "onnx_ir")}
EXIT_PARITY_FAILED = 1


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``export`` subcommand's arguments on ``parser``."""
    parser.add_argument("format", choices=sorted(FORMATS), help="artifact format")
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="Hugging Face Llama checkpoint directory (e.g. what `edgedistill distill` wrote), a "
        ".gguf file, or smollm2-135m (the default teacher)",
    )
    choices = "; ".join(
        f"{fmt}: {','.join(names)} (default {','.join(defaults)})" for fmt, (names, defaults) in FORMATS.items()
    )
    parser.add_argument("--quant", metavar="LIST", default=None, help=f"comma-separated quantizations. {choices}")
    parser.add_argument("--out", metavar="DIR", required=True, help="output directory (artifacts + manifest.json)")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="exit 0 even when an artifact fails parity (the manifest records the failure)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all this process may use)")
    parser.add_argument("--name", default=None, help="model name for file names and metadata (default: the source's)")
    parser.add_argument("--license", default=None, help="licence id for the metadata (default: the source's, if any)")
    parser.add_argument("--verbose", action="store_true", help="let llama.cpp, optimum and onnxruntime log")


def run(args: argparse.Namespace) -> int:
    """Export, check and publish; print a table and a last JSON line.

    Returns:
        0 when every artifact passes parity (or ``--allow-mismatch``), 1 otherwise.

    Raises:
        EdgeDistillError: bad input (not a checkpoint, an architecture we cannot export, an unknown quantization,
            an unwritable output) or a missing optional dependency.
    """
    recipe = ExportRecipe(
        format=args.format,
        model=args.model_dir,
        out=Path(args.out),
        quants=ExportRecipe.parse_quants(args.quant),
        allow_mismatch=args.allow_mismatch,
        threads=args.threads,
        name=args.name,
        license=args.license,
    )
    started = time.perf_counter()
    records = export(recipe, verbose=getattr(args, "verbose", False))
    seconds = time.perf_counter() - started
    print_table(records)
    failed = [r for r in records if not r.passed]
    summary = {
        "format": recipe.format,
        "out": str(recipe.out),
        "manifest": str(recipe.out / "manifest.json"),
        "passed": not failed,
        "allow_mismatch": recipe.allow_mismatch,
        "seconds": round(seconds, 3),
        "artifacts": [
            {
                "path": r.path,
                "quantization": r.quantization,
                "bytes": r.bytes,
                "size_ratio_to_f32": round(r.size_ratio_to_f32, 4),
                "seconds": round(r.seconds, 3),
                "max_logit_diff": r.parity["max_logit_diff"],
                "mean_logit_diff": r.parity["mean_logit_diff"],
                "top1_agreement": r.parity["top1_agreement"],
                "greedy_equal": r.parity["greedy_equal"],
                "tokenizer_matches": r.parity["tokenizer_matches"],
                "tokenizer_total": r.parity["tokenizer_total"],
                "passed": r.passed,
            }
            for r in records
        ],
    }
    print(json.dumps(summary, separators=(",", ":")))
    if failed and not recipe.allow_mismatch:
        names = ", ".join(r.path for r in failed)
        print(
            f"edgedistill: parity failed for {names} (see manifest.json; --allow-mismatch to accept)", file=sys.stderr
        )
        return EXIT_PARITY_FAILED
    return 0


def export(recipe: ExportRecipe, verbose: bool = False) -> list[ArtifactRecord]:
    """Run a recipe: the Python entry point behind :func:`run`. Returns the manifest records written."""
    from edgedistill.export.source import clean_name, resolve_source

    source = resolve_source(recipe.model)
    if recipe.name:
        source.name = clean_name(recipe.name)
    if recipe.license:
        source.license = recipe.license
    for module in ("torch", "transformers", *FORMAT_MODULES[recipe.format]):
        require(module)
    # The claim sweeps what a killed export left in --out and finishes a publish it began.
    with claim(recipe.out, "--out") as out:
        return _export(recipe, source, out, verbose)


def _export(recipe: ExportRecipe, source: ExportSource, out: Path, verbose: bool) -> list[ArtifactRecord]:
    import torch

    from edgedistill.export.parity import probe_prompt_ids, probe_strings, torch_reference
    from edgedistill.export.source import load_source

    threads = recipe.threads or _usable_cpus()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    staged: list[StagedArtifact] = []
    try:
        started = time.perf_counter()
        loaded = load_source(source)
        try:
            with _library_logs(verbose):
                progress(
                    f"export: loaded {source.spec} ({loaded.parameters / 1e6:.1f} M parameters) in "
                    f"{time.perf_counter() - started:.1f}s"
                )
                probes = probe_strings(loaded.tokenizer)
                prompts = probe_prompt_ids(loaded.tokenizer, loaded.model.config.max_position_embeddings)
                reference = torch_reference(loaded.model, prompts)
                if recipe.format == "gguf":
                    from edgedistill.export.gguf import export_gguf

                    staged = export_gguf(source, loaded, recipe.quants, out, reference, probes, threads, progress)
                else:
                    from edgedistill.export.onnx import export_onnx

                    staged = export_onnx(source, loaded, recipe.quants, out, reference, probes, threads, progress)
        finally:
            loaded.close()
        publish_with_manifest(out, staged)
    except BaseException:
        for artifact in staged:
            artifact.discard()
        raise
    finally:
        torch.set_num_threads(torch_threads)
    return [artifact.record for artifact in staged]


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _library_logs(verbose: bool) -> Iterator[None]:
    """Keep llama.cpp's, optimum's and onnxruntime's own logging at errors only, unless ``verbose``."""
    loggers = [logging.getLogger(name) for name in ("llama-cpp-python", "optimum", "onnxruntime")]
    levels = [log.level for log in loggers]
    if not verbose:
        for log in loggers:
            log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def print_table(records: list[ArtifactRecord]) -> None:
    """One line per artifact: size, ratio to 32-bit, time, parity figures, verdict."""
    header = (
        f"{'artifact':<40} {'MB':>8} {'/f32':>6} {'time s':>7} {'max|dlogit|':>11} {'mean':>8} {'top-1':>6} "
        f"{'greedy':>7} {'tokenizer':>9}  parity"
    )
    print(header)
    for r in records:
        p = r.parity
        greedy = "-" if p["greedy_equal"] is None else f"{p['greedy_tokens_matching']}/{p['greedy_tokens_total']}"
        print(
            f"{r.path:<40} {r.bytes / 1e6:>8.2f} {r.size_ratio_to_f32:>6.3f} {r.seconds:>7.1f} "
            f"{p['max_logit_diff']:>11.4g} {p['mean_logit_diff']:>8.3g} {p['top1_agreement']:>6.3f} {greedy:>7} "
            f"{p['tokenizer_matches']:>4}/{p['tokenizer_total']:<4}  {'pass' if r.passed else 'FAIL'}"
        )
