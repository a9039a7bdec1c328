"""``edgedistill export FORMAT MODEL_DIR --quant ... --out DIR``: the two functions the CLI registers.

:func:`add_args` declares the arguments (``FORMAT MODEL_DIR`` and :class:`ExportRecipe`'s flags, ``--config FILE``
included); :func:`run` checks the input, loads the model once, computes the PyTorch reference, exports and checks
every artifact through the format's :class:`~edgedistill.export.formats.ExportFormat`, publishes them with
``DIR/manifest.json``, prints a table and, as the last line of stdout, one compact JSON document. Both take the
format registry (``registry.py`` by default). Heavy libraries are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedistill.deps import require
from edgedistill.export.formats import ExportFormat, FormatRegistry, export_artifacts
from edgedistill.export.manifest import ArtifactRecord, StagedArtifact, publish_with_manifest
from edgedistill.export.recipe import ExportRecipe
from edgedistill.export.registry import FORMATS
from edgedistill.files import claim
from edgedistill.system import available_cpus

if TYPE_CHECKING:
    from edgedistill.export.source import ExportSource

EXIT_PARITY_FAILED = 1


def add_args(parser: argparse.ArgumentParser, formats: FormatRegistry = FORMATS) -> None:
    """Declare the ``export`` subcommand's arguments on ``parser``."""
    ExportRecipe.add_flags(parser, formats=formats)


def run(args: argparse.Namespace, formats: FormatRegistry = FORMATS) -> int:
    """Export, check and publish; print a table and a last JSON line.

    Returns:
        0 when every artifact passes parity (or ``--allow-mismatch``), 1 otherwise.

    Raises:
        EdgeDistillError: bad input (not a checkpoint, an architecture we cannot export, an unknown quantization,
            an unwritable output, a bad config file) or a missing optional dependency.
    """
    recipe = ExportRecipe.from_args(args, formats)
    started = time.perf_counter()
    records = export(recipe, formats=formats)
    seconds = time.perf_counter() - started
    print_table(records)
    print(json.dumps(summary(recipe, records, seconds), separators=(",", ":")))
    failed = [r for r in records if not r.passed]
    if failed and not recipe.allow_mismatch:
        names = ", ".join(r.path for r in failed)
        print(
            f"edgedistill: parity failed for {names} (see manifest.json; --allow-mismatch to accept)", file=sys.stderr
        )
        return EXIT_PARITY_FAILED
    return 0


def export(recipe: ExportRecipe, verbose: bool = False, formats: FormatRegistry = FORMATS) -> list[ArtifactRecord]:
    """Run a recipe: the Python entry point behind :func:`run`. Returns the manifest records written.

    Args:
        recipe: what to export, to which format and quantizations, where.
        verbose: let the libraries log (also ``recipe.verbose``).
        formats: the registry ``recipe.format`` is looked up in.
    """
    from edgedistill.export.source import clean_name, resolve_source

    fmt, quants = recipe.select(formats)
    source = resolve_source(recipe.model)
    if recipe.name:
        source.name = clean_name(recipe.name)
    if recipe.license:
        source.license = recipe.license
    for module in ("torch", "transformers", *fmt.modules):
        require(module)
    # The claim sweeps what a killed export left in --out and finishes a publish it began.
    with claim(recipe.out_dir, "--out") as out:
        return _export(fmt, quants, recipe, source, out, verbose or recipe.verbose)


def _export(
    fmt: ExportFormat, quants: list[str], recipe: ExportRecipe, source: ExportSource, out: Path, verbose: bool
) -> list[ArtifactRecord]:
    """Load the model, compute PyTorch's answers, run the format's export and publish what it staged."""
    import torch

    from edgedistill.export.parity import probe_prompt_ids, probe_strings, torch_reference
    from edgedistill.export.source import load_source

    threads = recipe.threads or len(available_cpus())
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    staged: list[StagedArtifact] = []
    try:
        started = time.perf_counter()
        loaded = load_source(source)
        try:
            with _library_logs(verbose):
                _progress(
                    f"export: loaded {source.spec} ({loaded.parameters / 1e6:.1f} M parameters) in "
                    f"{time.perf_counter() - started:.1f}s"
                )
                probes = probe_strings(loaded.tokenizer)
                prompts = probe_prompt_ids(loaded.tokenizer, loaded.model.config.max_position_embeddings)
                reference = torch_reference(loaded.model, prompts)
                staged = export_artifacts(fmt, source, loaded, quants, out, reference, probes, threads, _progress)
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


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


def summary(recipe: ExportRecipe, records: list[ArtifactRecord], seconds: float) -> dict[str, Any]:
    """The run as the last line of stdout states it."""
    return {
        "format": recipe.format,
        "out": recipe.out,
        "manifest": str(recipe.out_dir / "manifest.json"),
        "passed": all(r.passed for r in records),
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
