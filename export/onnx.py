"""ONNX export: a decoder with past key/value inputs and outputs, quantized by onnxruntime, checked in onnxruntime.

Recipe, top to bottom:

1. Export the float32 decoder with optimum-onnx (``main_export``, task ``text-generation-with-past``).
2. Derive int8 (onnxruntime dynamic quantization, per-channel weights) and int4 (onnxruntime's MatMulNBits
   weight-only quantizer) from it.
3. Put ``config.json``, ``generation_config.json`` and the tokenizer files beside each ``model.onnx``, so that each
   artifact directory loads in optimum's ``ORTModelForCausalLM`` as well as in plain onnxruntime.
4. Run each model in plain onnxruntime and compare logits, greedy tokens and (through the saved tokenizer) token
   ids with PyTorch and the Hugging Face tokenizer.

:class:`OnnxFormat` fills these steps into the shared skeleton (``formats.py``): each artifact is a directory
built under a temporary name in the output directory and renamed into place by the caller.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError
from edgedistill.export.formats import Conversion, ExportFormat, ExportJob, export_artifacts
from edgedistill.export.parity import (
    GREEDY_TOKENS,
    ParityReport,
    Reference,
    Thresholds,
    TokenizerProbes,
    hf_token_ids,
    judge_answers,
)
from edgedistill.isolate import run_isolated


@dataclass(frozen=True)
class OnnxQuant:
    """One ``--quant`` name for ONNX: how the model is derived from the float32 export, and its thresholds."""

    method: str
    thresholds: Thresholds


# Thresholds: a correct export passes them, a broken one fails them by far. Measured on SmolLM2-135M over the 10
# probe prompts (258 positions), max / mean |logit diff| and top-1 agreement: fp32 1.4e-4 / 1.1e-5 / 1.00;
# int8 8.4 / 0.99 / 0.85; int4 19.9 / 1.56 / 0.75. For scale: llama.cpp's pure q4_0 of the same model 25 / 2.7 / 0.68,
# and a GGUF with q/k in the wrong layout 33 / 5.3 / 0.57 (gguf.py). fp32 is the same computation in another engine
# (FACTS.md: within 1.5e-6 on a small Llama).
ONNX_QUANTS: dict[str, OnnxQuant] = {
    "fp32": OnnxQuant("optimum export", Thresholds(1e-2, 1e-3, min_top1=1.0, greedy_equal=True)),
    "int8": OnnxQuant(
        "quantize_dynamic int8, per-channel weights; MLP down projections int8 weight-only",
        Thresholds.lossy(16.0, 2.0, min_top1=0.8),
    ),
    "int4": OnnxQuant(
        "MatMulNBits 4-bit, block 32, symmetric; v and MLP down projections 8-bit",
        Thresholds.lossy(24.0, 2.5, min_top1=0.65),
    ),
}
DEFAULT_ONNX_QUANTS = ("fp32", "int8", "int4")

# Input and output names of the exported decoder, declared once (they are optimum's for text-generation-with-past).
ONNX_OPSET = 18  # FACTS.md: opset 18 or newer is recommended for llama
ONNX_TASK = "text-generation-with-past"
MODEL_FILE = "model.onnx"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
PAST = "past_key_values.{layer}.{kind}"
PRESENT = "present.{layer}.{kind}"
LOGITS = "logits"
KV_KINDS = ("key", "value")
# Weight-only quantization (MatMulNBits): blocks of 32 weights per scale along the input dimension, as llama.cpp's
# q4_0/q8_0; symmetric. accuracy_level 4 lets the CPU kernel round activations to int8 per block and use integer
# dot products, onnxruntime's recommended CPU setting (on SmolLM2-135M it moved top-1 agreement by under 0.01).
NBITS_BLOCK_SIZE = 32
NBITS_ACCURACY_LEVEL = 4
# Projections whose weights stay at 8 bits in the int4 recipe, as llama.cpp's Q4_K_M keeps attn_v and ffn_down at
# higher precision. On SmolLM2-135M this took top-1 agreement from 0.63 to 0.76 for 1 % more bytes.
# Matched against optimum's node names, which follow the Hugging Face module paths.
INT4_KEEP_8BIT = ("/self_attn/v_proj/", "/mlp/down_proj/")
# Projections that int8 does not quantize dynamically: the input of the MLP down projection (the SwiGLU product)
# carries outliers that wreck a per-tensor activation scale (SmolLM2-135M: top-1 agreement 0.60 with them, 0.91
# without). Their weights are int8 weight-only instead (MatMulNBits, 8 bits), activations stay float.
INT8_WEIGHT_ONLY = ("/mlp/down_proj/",)
# Files that optimum writes beside the model and every artifact directory carries.
SIDE_FILES = ("config.json", "generation_config.json")


# ---------------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer warnings and prints of torch.onnx and optimum, and the quantizers' INFO logging."""
    # onnxruntime's quantizers log through the root logger.
    loggers = [logging.getLogger(name) for name in ("", "optimum", "transformers", "torch.onnx", "onnxruntime")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def export_fp32(checkpoint: Path, directory: Path) -> None:
    """Export a Hugging Face checkpoint to ``directory/model.onnx`` with optimum-onnx."""
    from optimum.exporters.onnx import main_export

    with _quiet():
        main_export(
            str(checkpoint), output=str(directory), task=ONNX_TASK, opset=ONNX_OPSET, device="cpu", do_validation=False
        )
    if not (directory / MODEL_FILE).is_file():
        raise EdgeDistillError(f"onnx: optimum wrote no {MODEL_FILE} for {checkpoint}")


def _external_data(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE)


def _matmul_nodes(model: Any, patterns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Names of the MatMul nodes whose name contains one of ``patterns``, and of the others."""
    names = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    chosen = [name for name in names if any(pattern in name for pattern in patterns)]
    return chosen, [name for name in names if name not in chosen]


def _nbits_quantizer_class() -> Any:
    """onnxruntime's MatMulNBitsQuantizer. Importing its module calls ``logging.basicConfig(level=INFO)``; the root
    logger's level is put back so that the rest of the process does not start logging at INFO."""
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    return MatMulNBitsQuantizer


def _weight_only(model: Any, bits: int, exclude: list[str]) -> Any:
    """MatMulNBits quantization of every MatMul with a constant weight, except the ``exclude`` nodes."""
    MatMulNBitsQuantizer = _nbits_quantizer_class()  # noqa: N806
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=NBITS_BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=NBITS_ACCURACY_LEVEL,
        nodes_to_exclude=exclude,
    )
    quantizer.process()
    return quantizer.model.model


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: weights int8 per output channel, activations quantized per tensor at run time.

    The :data:`INT8_WEIGHT_ONLY` projections get int8 weight-only quantization instead; MatMuls of two
    activations (attention scores, RoPE angles) are left in float (``MatMulConstBOnly``). Weights use 7 bits
    (``reduce_range``): x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply u8 activations by s8 weights
    with ``pmaddubsw``, whose int16 sums saturate with full-range weights. Measured on a Zen 3 EPYC (AVX2, no
    VNNI): the default teacher's int8 export agreed with PyTorch on 24 % of top-1 tokens (max logit error 33)
    with 8-bit weights; an artifact must run right on every CPU it may be shipped to, not only the exporting one.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _nbits_quantizer_class()
    with _quiet():
        model = onnx.load(str(src / MODEL_FILE))
        _, others = _matmul_nodes(model, INT8_WEIGHT_ONLY)
        model = _weight_only(model, bits=8, exclude=others)
        quantize_dynamic(
            model,
            dst / MODEL_FILE,
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=bool(_external_data(src)),
        )


def quantize_int4(src: Path, dst: Path) -> None:
    """Weight-only int4 (MatMulNBits) of every MatMul with a constant weight; :data:`INT4_KEEP_8BIT` at 8 bits."""
    import onnx

    _nbits_quantizer_class()
    with _quiet():
        model = onnx.load(str(src / MODEL_FILE))
        _, others = _matmul_nodes(model, INT4_KEEP_8BIT)
        model = _weight_only(model, bits=8, exclude=others)
        model = _weight_only(model, bits=4, exclude=[])
        onnx.save_model(
            model, str(dst / MODEL_FILE), save_as_external_data=bool(_external_data(src)), location=MODEL_FILE + "_data"
        )


def _copy_side_files(src: Path, dst: Path, tokenizer: Any) -> None:
    """Config files from the float32 export, and the source's tokenizer (over whatever optimum copied)."""
    if src != dst:
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    tokenizer.save_pretrained(dst)


# ------------------------------------------------------------------------------------------------ onnxruntime


def session(model_path: Path, threads: int) -> Any:
    """A plain onnxruntime CPU session."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_onnx(
    sess: Any,
    layers: int,
    kv_heads: int,
    head_dim: int,
    prompt_ids: list[list[int]],
    greedy_prompts: int,
    greedy_tokens: int = GREEDY_TOKENS,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """onnxruntime's logits at every position of each prompt and greedy continuations of the first ones.

    The prompt runs with an empty past; each greedy step feeds the previous step's ``present`` as ``past``.
    """
    input_names = {i.name for i in sess.get_inputs()}
    output_names = [o.name for o in sess.get_outputs()]

    def step(ids: list[int], past: dict[str, np.ndarray], past_length: int) -> tuple[np.ndarray, dict]:
        feed = {
            INPUT_IDS: np.array([ids], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, past_length + len(ids)), dtype=np.int64),
        }
        if POSITION_IDS in input_names:
            feed[POSITION_IDS] = np.arange(past_length, past_length + len(ids), dtype=np.int64)[None]
        feed.update(past)
        outputs = dict(zip(output_names, sess.run(output_names, feed)))
        present = {
            PAST.format(layer=layer, kind=kind): outputs[PRESENT.format(layer=layer, kind=kind)]
            for layer in range(layers)
            for kind in KV_KINDS
        }
        return outputs[LOGITS][0], present

    empty = {
        PAST.format(layer=layer, kind=kind): np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        for layer in range(layers)
        for kind in KV_KINDS
    }
    logits, greedy = [], []
    for index, ids in enumerate(prompt_ids):
        prompt_logits, past = step(ids, empty, 0)
        logits.append(np.asarray(prompt_logits, dtype=np.float32))
        if index >= greedy_prompts:
            continue
        tokens = [int(np.argmax(prompt_logits[-1]))]
        while len(tokens) < greedy_tokens:
            step_logits, past = step([tokens[-1]], past, len(ids) + len(tokens) - 1)
            tokens.append(int(np.argmax(step_logits[-1])))
        greedy.append(tokens)
    return logits, greedy


def onnx_answers(
    model_file: Path,
    threads: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    prompt_ids: list[list[int]],
    greedy_prompts: int,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """onnxruntime's logits and greedy tokens on the prompts; runs inside :func:`~edgedistill.isolate.run_isolated`
    (a native crash there becomes an error naming the artifact)."""
    return run_onnx(session(model_file, threads), layers, kv_heads, head_dim, prompt_ids, greedy_prompts)


def check_onnx(
    directory: Path,
    quant: str,
    config: Any,
    reference: Reference,
    probes: list[str],
    expected: list[list[int]],
    special_texts: list[str],
    special_expected: list[list[int]],
    threads: int,
) -> ParityReport:
    """Run an artifact directory in plain onnxruntime and its saved tokenizer, and judge both.

    Args:
        directory: the artifact directory (``model.onnx``, config and tokenizer files).
        quant: its name in :data:`ONNX_QUANTS` (selects the thresholds).
        config: the model's transformers config (layers and key/value shapes).
        reference: PyTorch's answers on the probe prompts.
        probes: tokenizer probe strings; ``expected`` their Hugging Face ids.
        special_texts: strings compared with specials added; ``special_expected`` their Hugging Face ids.
        threads: CPU threads for onnxruntime.
    """
    from transformers import AutoTokenizer

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    logits, greedy = run_isolated(
        onnx_answers,
        directory / MODEL_FILE,
        threads,
        config.num_hidden_layers,
        config.num_key_value_heads,
        head_dim,
        reference.prompt_ids,
        len(reference.greedy),
        what=f"parity check of {directory.name} in onnxruntime",
    )
    saved = AutoTokenizer.from_pretrained(str(directory))
    tokens = TokenizerProbes(probes, expected, special_texts, special_expected)
    probe_ids = hf_token_ids(saved, probes)
    special_ids = [saved(text, add_special_tokens=True)["input_ids"] for text in special_texts]
    return judge_answers(ONNX_QUANTS[quant].thresholds, reference, logits, greedy, tokens, probe_ids, special_ids)


def directory_bytes(directory: Path) -> int:
    """The model's size: ``model.onnx`` plus any external weight data."""
    return sum(p.stat().st_size for p in [directory / MODEL_FILE, *_external_data(directory)])


# ------------------------------------------------------------------------------------------------------ format

# How each quantization is derived from the float32 export (fp32 is that export itself).
QUANTIZERS: dict[str, Callable[[Path, Path], None]] = {"int8": quantize_int8, "int4": quantize_int4}


class OnnxFormat(ExportFormat):
    """ONNX's part of the export skeleton (:func:`~edgedistill.export.formats.export_artifacts`): a decoder with
    past key/values exported by optimum-onnx, quantized by onnxruntime, checked in plain onnxruntime. Each artifact
    is a directory: ``model.onnx`` (and any external data), the config files and the tokenizer."""

    name = "onnx"
    quants = ONNX_QUANTS
    default_quants = DEFAULT_ONNX_QUANTS
    base_quant = "fp32"
    modules = ("optimum", "onnxruntime", "onnx", "onnx_ir")
    tools = ("optimum-onnx", "onnxruntime", "onnx", "torch", "transformers")
    converted = "exported the float32 decoder"

    def artifact_name(self, model_name: str, quant: str) -> str:
        return f"{model_name}-onnx-{quant}"

    def model_file(self, artifact: Path) -> Path:
        return artifact / MODEL_FILE

    def size(self, artifact: Path) -> int:
        return directory_bytes(artifact)

    def convert(self, job: ExportJob, plan: None, base: Path) -> None:
        base.mkdir()
        try:
            export_fp32(job.loaded.checkpoint, base)
        except EdgeDistillError:
            raise
        except Exception as err:
            raise EdgeDistillError(
                f"onnx: optimum cannot export {job.source.path} ({type(err).__name__}: {err})"
            ) from None
        _copy_side_files(base, base, job.loaded.tokenizer)

    def derive(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> None:
        artifact.mkdir()
        QUANTIZERS[quant](conversion.path, artifact)
        _copy_side_files(conversion.path, artifact, job.loaded.tokenizer)

    def check(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> ParityReport:
        p = job.probes
        return check_onnx(
            artifact,
            quant,
            job.loaded.model.config,
            job.reference,
            p.strings,
            p.expected,
            p.special_texts,
            p.special_expected,
            job.threads,
        )

    def details(
        self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path, parity_seconds: float
    ) -> dict[str, Any]:
        return {
            "method": ONNX_QUANTS[quant].method,
            "opset": ONNX_OPSET,
            "task": ONNX_TASK,
            "directory": self.artifact_name(job.source.name, quant),
            "external_data": [p.name for p in _external_data(artifact)],
            "parity_runtime": {"engine": "onnxruntime", "provider": "CPUExecutionProvider"},
            "tools": conversion.tools,
            "conversion_seconds": round(conversion.seconds, 3),
            "parity_seconds": round(parity_seconds, 3),
        }


ONNX = OnnxFormat()


# The skeleton run with ONNX, under the name callers know: export_onnx(source, loaded, quants, out, reference,
# probes, threads, progress) -> the checked artifact directories, still under temporary names (see export_artifacts).
export_onnx = functools.partial(export_artifacts, ONNX)
