"""Distillation speed: seconds per optimizer step, tokens/s and peak RSS for a teacher/student shape pair.

Runs the recipe's own ``train_step`` (teacher forward under no_grad at the supervised positions, student forward
and backward, the alpha-mixed loss, clipping, AdamW) on random token ids, so it measures exactly what
``edgedistill distill`` does per step, without data loading. Both models are randomly initialised Llamas.

    python -m edgedistill.bench.distill_speed                      # MiniMind's comparison configuration
    python -m edgedistill.bench.distill_speed --teacher-hidden 576 --teacher-layers 30 --vocab 49152 ...

The defaults are the configuration MiniMind's ``train_distillation.py`` was measured on here (FACTS.md): teacher
512 x 8 layers, student 256 x 4, vocabulary 6400, batch 4 x 256, fp32, 2 threads — MiniMind's own shapes
(8 heads, 2 KV heads, FFN 4·d·2/3 rounded up to a multiple of 64).
Peak RSS is the process's high-water mark (``ru_maxrss``), imports included, as MiniMind's was measured.
The last line of stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any


def minimind_ffn(hidden: int, multiple_of: int = 64) -> int:
    """MiniMind's FFN width: 4·d, times 2/3, rounded up to a multiple of 64."""
    width = int(2 * (4 * hidden) / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=minimind_ffn(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    return LlamaForCausalLM(config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` optimizer steps after ``args.warmup`` untimed ones; the measurements as a dict."""
    import torch

    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.heads import resolve_dtype

    torch.set_num_threads(args.threads)
    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = TrainConfig(
        out="-",
        alpha=args.alpha,
        temperature=args.temperature,
        loss=args.loss,
        steps=args.steps + args.warmup,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        teacher_dtype=args.teacher_dtype,
        precision=args.precision,
        device="cpu",
    )
    device = torch.device("cpu")
    teacher = _llama(args.vocab, args.teacher_hidden, args.teacher_layers, args.heads, args.kv_heads, seed=1)
    teacher.to(resolve_dtype(config.teacher_dtype, device)).eval().requires_grad_(False)
    student = _llama(args.vocab, args.student_hidden, args.student_layers, args.heads, args.kv_heads, seed=2).train()
    student_dtype = resolve_dtype(config.precision, device)
    times = _time_steps(args, config, teacher, student, student_dtype, device)
    tokens = args.batch_size * args.seq_len
    mean = statistics.fmean(times)
    return {
        "teacher": {
            "hidden": args.teacher_hidden,
            "layers": args.teacher_layers,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "dtype": str(resolve_dtype(config.teacher_dtype, device)).removeprefix("torch."),
        },
        "student": {
            "hidden": args.student_hidden,
            "layers": args.student_layers,
            "parameters": sum(p.numel() for p in student.parameters()),
            "dtype": "float32 weights, " + str(student_dtype).removeprefix("torch.") + " compute",
        },
        "vocab": args.vocab,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "loss": args.loss,
        "alpha": args.alpha,
        "steps_timed": len(times),
        "warmup_steps": args.warmup,
        "seconds_per_step": mean,
        "seconds_per_step_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_second": tokens / mean,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss_after_import,
        "torch": torch.__version__,
    }


def _time_steps(
    args: argparse.Namespace, config: Any, teacher: Any, student: Any, student_dtype: Any, device: Any
) -> list[float]:
    """Seconds of each step after the warm-up: the recipe's ``train_step`` on random token ids, the teacher's
    forward included."""
    import numpy as np

    from edgedistill.distill.data import PackedData
    from edgedistill.distill.evaluation import supervised_batch
    from edgedistill.distill.heads import DistillationObjective, SupervisedLogits, release_free_memory, teacher_signal
    from edgedistill.distill.steps import make_optimizer, train_step

    objective = DistillationObjective(student, config, chunked=not args.unchunked, dtype=student_dtype)
    teacher_head = SupervisedLogits(teacher) if args.alpha < 1 else None
    optimizer, scheduler = make_optimizer(student, config)
    release_free_memory()  # as the recipe does after loading: model construction garbage is not training memory

    rng = np.random.default_rng(0)
    rows = args.batch_size * (args.steps + args.warmup)
    data = PackedData(
        rng.integers(0, args.vocab, size=(rows, args.seq_len + 1), dtype=np.int32),
        np.ones((rows, args.seq_len + 1), dtype=np.float32),
    )
    times = []
    for step in range(args.warmup + args.steps):
        batch = supervised_batch(data, slice(step * args.batch_size, (step + 1) * args.batch_size), device)
        start = time.perf_counter()
        signal = teacher_signal(teacher_head, batch[0], batch[1])
        train_step(objective, [(*batch, signal)], optimizer, scheduler, config.grad_clip)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss", default="fkl")
    parser.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="the student's compute type"
    )
    parser.add_argument(
        "--unchunked",
        action="store_true",
        help="reference: the whole batch's [positions x vocabulary] logits at once, no chunking",
    )
    args = parser.parse_args(argv)
    result = run(args)
    print(
        f"teacher {args.teacher_hidden}x{args.teacher_layers} ({result['teacher']['parameters'] / 1e6:.1f}M, "
        f"{result['teacher']['dtype']}) -> student {args.student_hidden}x{args.student_layers} "
        f"({result['student']['parameters'] / 1e6:.1f}M, float32), vocab {args.vocab}, "
        f"batch {args.batch_size}x{args.seq_len}, {args.threads} threads"
    )
    print(
        f"  {result['seconds_per_step']:.3f} ± {result['seconds_per_step_stdev']:.3f} s/step   "
        f"{result['tokens_per_second']:.0f} tokens/s   peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(after imports {result['rss_after_imports_mb']:.0f} MB)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
