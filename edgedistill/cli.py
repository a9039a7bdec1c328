"""The ``edgedistill`` command: subcommand names mapped to plain functions.

Heavy libraries (torch, transformers, onnxruntime, llama_cpp) are imported inside the command functions, so
``edgedistill --help`` is instant. An :class:`EdgeDistillError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgedistill import __version__
from edgedistill.errors import EdgeDistillError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage text plus the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # the same prefix as every other error (a subcommand's prog is "edgedistill distill"), so scripts match one
        self.exit(2, f"edgedistill: error: {message} (see {self.prog} --help)\n")


def _cmd_distill(args: argparse.Namespace) -> int:
    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.train import train

    config = TrainConfig.from_args(args)
    summary = train(config)
    if summary:
        heldout = summary["heldout"]
        line = f"held-out CE {heldout['ce']:.4f}  perplexity {heldout['perplexity']:.2f}"
        if "top1_agreement" in heldout:
            line += f"  KD {heldout['kd_to_teacher']:.4f}  top-1 agreement {heldout['top1_agreement']:.3f}"
        print(line)
        print(f"student written to {config.out}")
        print(json.dumps({"out": config.out, "heldout": heldout}))
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _distill_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.distill.config import TrainConfig

    TrainConfig.add_flags(parser)  # flags and help come from the fields


def _cache_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.distill.config import CacheConfig

    CacheConfig.add_flags(parser)


def _cmd_cache(args: argparse.Namespace) -> int:
    from edgedistill.distill.cache import make_cache
    from edgedistill.distill.config import CacheConfig

    config = CacheConfig.from_args(args)
    manifest = make_cache(config)
    summary = {
        "out": config.out,
        "tokens": manifest.tokens,
        "top_k": manifest.top_k,
        "backend": manifest.backend,
        "seconds": manifest.seconds,
        "tokens_per_second": manifest.tokens_per_second,
    }
    print(
        f"teacher cache written to {config.out}: {manifest.tokens} positions, top-{manifest.top_k}, "
        f"{manifest.tokens_per_second:.0f} tokens/s ({manifest.backend})"
    )
    print(json.dumps(summary))
    return 0


def _prune_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.distill.config import PruneConfig

    parser.add_argument("source_model", nargs="?", metavar="SOURCE", help="the model to cut (same as --source)")
    PruneConfig.add_flags(parser)


def _cmd_prune(args: argparse.Namespace) -> int:
    from edgedistill.distill.config import PruneConfig
    from edgedistill.distill.prune import run_prune

    if args.source_model is not None:
        if args.source is not None and args.source != args.source_model:
            raise EdgeDistillError(f"source: given twice ({args.source_model!r} and --source {args.source!r})")
        args.source = args.source_model
    config = PruneConfig.from_args(args)
    record = run_prune(config)
    chosen = record["chosen"]
    print(f"pruned student written to {config.out}: {chosen['parameters'] / 1e6:.2f} M parameters, {chosen['shape']}")
    print(json.dumps({"out": config.out, "chosen": chosen}))
    return 0


def _export_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.export.cli import add_args

    add_args(parser)


def _cmd_export(args: argparse.Namespace) -> int:
    from edgedistill.export.cli import run

    return run(args)


def _runtime(name: str) -> Callable[..., Any]:
    """A function of ``edgedistill.runtime.cli``, imported when the command runs (the runtime needs no torch)."""

    def call(arg: Any) -> Any:
        from edgedistill.runtime import cli as runtime_cli

        return getattr(runtime_cli, name)(arg)

    return call


COMMANDS["distill"] = ("distil a teacher into a student (Hugging Face checkpoint out)", _distill_args, _cmd_distill)
COMMANDS["prune"] = (
    "derive a student from a teacher by structured pruning (channels, heads, FFN neurons, layers)",
    _prune_args,
    _cmd_prune,
)
COMMANDS["teacher-cache"] = ("run the teacher once and store its top-K for many students", _cache_args, _cmd_cache)


def _teacher_data_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.distill.teacher_data import TeacherDataConfig

    TeacherDataConfig.add_flags(parser)


def _cmd_teacher_data(args: argparse.Namespace) -> int:
    from edgedistill.distill.teacher_data import TeacherDataConfig, make_teacher_data

    config = TeacherDataConfig.from_args(args)
    manifest = make_teacher_data(config)
    generation, single = manifest["generation"], manifest["single_sequence"]
    if manifest.get("already_complete"):
        print(f"{config.out} is already complete with these settings: {manifest['records']} answers")
    else:
        print(
            f"{manifest['records']} answers written to {config.out} ({manifest['answers']['tokens']} tokens, "
            f"{generation['seconds']:.0f} s); decoding {manifest['llama_cpp']['sequences']} sequences together: "
            f"{generation['decode_tokens_per_second']:.1f} tokens/s ({generation['decode_tokens_per_cpu_second']:.1f} "
            f"per CPU second), one at a time: {single['decode_tokens_per_second']:.1f} "
            f"({single['decode_tokens_per_cpu_second']:.1f})"
        )
    summary = {
        "out": config.out,
        "records": manifest["records"],
        "tokens": manifest["answers"]["tokens"],
        "tokens_per_second": generation["tokens_per_second"],
        "decode_tokens_per_second": generation["decode_tokens_per_second"],
        "decode_tokens_per_cpu_second": generation["decode_tokens_per_cpu_second"],
        "single_sequence_decode_tokens_per_second": single["decode_tokens_per_second"],
        "single_sequence_decode_tokens_per_cpu_second": single["decode_tokens_per_cpu_second"],
        "batching_speedup": manifest["batching_speedup"],
    }
    print(json.dumps(summary))
    return 0


COMMANDS["teacher-data"] = (
    "the teacher answers a prompt set (batched in llama.cpp): chat data for distill --data",
    _teacher_data_args,
    _cmd_teacher_data,
)
COMMANDS["generate"] = (
    "generate text from a .gguf or ONNX model",
    _runtime("add_generate_args"),
    _runtime("run_generate"),
)
COMMANDS["chat"] = (
    "chat with a model in the terminal (/reset, /exit)",
    _runtime("add_chat_args"),
    _runtime("run_chat"),
)
COMMANDS["serve"] = (
    "an OpenAI-compatible HTTP server (127.0.0.1 by default)",
    _runtime("add_serve_args"),
    _runtime("run_serve"),
)
COMMANDS["export"] = (
    "export a model to GGUF or ONNX, each artifact checked against PyTorch",
    _export_args,
    _cmd_export,
)


def _bench_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.bench.cli import add_args

    add_args(parser)


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgedistill.bench.cli import run

    return run(args)


COMMANDS["bench"] = (
    "measure latency, throughput, memory and quality of models (torch-free; projections onto edge targets)",
    _bench_args,
    _cmd_bench,
)


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    """``--stages`` and one flag per pipeline setting (help beside each field in edgedistill/stages/)."""
    from edgedistill.pipeline import STAGES, PipelineConfig

    parser.add_argument(
        "--stages", metavar="LIST", help=f"comma-separated subset of {','.join(STAGES)} (default: all but finished)"
    )
    PipelineConfig.add_flags(parser)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from edgedistill.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig.from_args(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    started = time.perf_counter()
    report = run_pipeline(config, stages)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return 0


COMMANDS["pipeline"] = (
    "teacher -> students with and without distillation -> GGUF/ONNX -> bench -> report.md (the main job)",
    _pipeline_args,
    _cmd_pipeline,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgedistill", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"edgedistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (summary, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except EdgeDistillError as err:
        print(f"edgedistill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgedistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
