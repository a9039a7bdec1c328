"""The shapes a pruned student may take (``edgedistill prune``'s search space): every shape of a source that meets a
parameter target with widths every GGUF quantization takes (:func:`candidate_shapes`), and a spread of the most
promising few by a cheap prior before any probe (:func:`select_candidates`).
:mod:`edgedistill.distill.prune` scores them and slices the winner."""

from __future__ import annotations

import dataclasses
import math

from edgedistill.distill.config import PRESET_TOLERANCE, StudentShape

# Widths are multiples of this (q8_0 / q4_0 blocks are 32 values); multiples of K_QUANT_BLOCK are preferred.
WIDTH_QUANTUM = 32
K_QUANT_BLOCK = 256


def parameter_count(shape: StudentShape, vocab_size: int, tied: bool = True) -> int:
    return shape.parameter_count(vocab_size) + (0 if tied else vocab_size * shape.hidden_size)


def candidate_shapes(
    source: StudentShape,
    vocab_size: int,
    target: float,
    tolerance: float = PRESET_TOLERANCE,
    tied: bool = True,
    quantum: int = WIDTH_QUANTUM,
) -> list[StudentShape]:
    """Every shape prunable from ``source`` within ``tolerance`` of ``target`` parameters: hidden widths that
    are multiples of ``quantum`` (and of the head size's group when heads shrink with them), every depth and KV
    group count, and the FFN width (a multiple of ``quantum``; of 256 when that stays within tolerance) that
    brings the count closest to the target."""
    group = source.num_attention_heads // source.num_key_value_heads
    shapes = []
    for hidden in range(quantum, source.hidden_size + 1, quantum):
        for kv in range(1, source.num_key_value_heads + 1):
            for layers in range(1, source.num_hidden_layers + 1):
                base = dataclasses.replace(
                    source,
                    hidden_size=hidden,
                    num_hidden_layers=layers,
                    num_attention_heads=kv * group,
                    num_key_value_heads=kv,
                    intermediate_size=quantum,
                )
                fixed = parameter_count(base, vocab_size, tied) - layers * 3 * hidden * quantum
                ffn_exact = (target - fixed) / (layers * 3 * hidden)
                best = None
                for step in (K_QUANT_BLOCK, quantum):
                    ffn = int(round(ffn_exact / step)) * step
                    if not quantum <= ffn <= source.intermediate_size:
                        continue
                    shape = dataclasses.replace(base, intermediate_size=ffn)
                    if abs(parameter_count(shape, vocab_size, tied) / target - 1) <= tolerance:
                        best = shape
                        break
                if best is not None:
                    shapes.append(best)
    return shapes


def shape_dict(shape: StudentShape) -> dict[str, int]:
    return dataclasses.asdict(shape)


def _prior(shape: StudentShape, source: StudentShape) -> float:
    """A cheap ordering of candidates before any probe: prefer keeping a balanced share of width and depth
    (Minitron: width pruning recovers better than depth pruning, so depth counts double)."""
    kept = [
        shape.hidden_size / source.hidden_size,
        shape.intermediate_size / source.intermediate_size,
        shape.num_key_value_heads / source.num_key_value_heads,
    ]
    depth = shape.num_hidden_layers / source.num_hidden_layers
    return -sum(abs(math.log(k / depth)) for k in kept) - 2 * abs(math.log(depth))


def select_candidates(shapes: list[StudentShape], source: StudentShape, limit: int) -> list[StudentShape]:
    """At most ``limit`` shapes, spread over hidden widths: for each width, its best by :func:`_prior`, then the
    next best overall."""
    ranked = sorted(shapes, key=lambda s: _prior(s, source), reverse=True)
    chosen: list[StudentShape] = []
    for hidden in sorted({s.hidden_size for s in ranked}, reverse=True):
        chosen.append(next(s for s in ranked if s.hidden_size == hidden))
    chosen = sorted(chosen, key=lambda s: _prior(s, source), reverse=True)[:limit]
    for shape in ranked:
        if len(chosen) >= limit:
            break
        if shape not in chosen:
            chosen.append(shape)
    return chosen
