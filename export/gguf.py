"""GGUF export: a llama-architecture file written with gguf-py, quantized by llama.cpp, checked in llama.cpp.

Recipe, top to bottom:

1. Convert the Hugging Face tokenizer into GGUF vocabulary fields (tokens, merges, token types, special ids,
   BOS/EOS behaviour, chat template) and choose ``tokenizer.ggml.pre`` by probing: every candidate name is written
   into a weightless GGUF, loaded in llama.cpp, and scored on the probe strings against the Hugging Face ids.
2. Write the float32 model with gguf-py's constants and tensor-name table, the q and k projections permuted from
   Hugging Face's rotate-half layout to the interleaved one llama.cpp expects.
3. Quantize that file with llama.cpp's own quantizer (``llama_model_quantize``) into each requested type.
4. Load each artifact in llama.cpp and compare logits, greedy tokens and token ids with PyTorch's. llama.cpp runs
   in a child interpreter there (:func:`~edgedistill.isolate.run_isolated`), so a native crash becomes an error
   that names the file instead of the death of the export.

:class:`GgufFormat` fills these steps into the shared skeleton (``formats.py``), which writes every file under a
temporary name in the output directory, records it, and leaves the rename into place to the caller.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill import __version__
from edgedistill.errors import EdgeDistillError
from edgedistill.export.formats import Conversion, ExportFormat, ExportJob, export_artifacts
from edgedistill.export.parity import (
    GREEDY_TOKENS,
    MAX_PROBE_TOKENS,
    ParityReport,
    Reference,
    Thresholds,
    TokenizerProbes,
    count_equal,
    judge_answers,
)
from edgedistill.files import remove_path, temp_path
from edgedistill.isolate import run_isolated
from edgedistill.llamacpp import LlamaCpp


@dataclass(frozen=True)
class GgufQuant:
    """One ``--quant`` name: the llama.cpp file type (a constant of ``llama_cpp``) and its parity thresholds."""

    ftype: str
    thresholds: Thresholds


# Thresholds: a correct export passes them, a wrong layout fails them by far. Measured on SmolLM2-135M (logits span
# about -35..+42) over the 10 probe prompts (258 positions), max / mean |logit diff| and top-1 agreement:
#   f32 1.2e-4 / 9e-6 / 1.00    f16 0.095 / 0.008 / 1.00    q8_0 3.7 / 0.28 / 0.94    q6_k 6.5 / 0.49 / 0.94
#   q5_k_m 18 / 1.2 / 0.85      q4_k_m 8.8 / 0.93 / 0.88    q4_0 25 / 2.7 / 0.68
#   the same weights with q/k left in Hugging Face's layout (f32): 33 / 5.3 / 0.57.
# The lossy types' floor is llama.cpp's own rounding of activations to 8 bits: the teacher's original Q4_1 file,
# whose weights PyTorch dequantizes exactly, differs by 1.4 (max) with 0.98 top-1. SmolLM2-135M's width (576) is
# not a multiple of 256, so the k-quants fall back to q5_0/q5_1/q8_0 for most of its tensors.
GGUF_QUANTS: dict[str, GgufQuant] = {
    "f32": GgufQuant("LLAMA_FTYPE_ALL_F32", Thresholds(1e-2, 1e-3, min_top1=1.0, greedy_equal=True)),
    "f16": GgufQuant("LLAMA_FTYPE_MOSTLY_F16", Thresholds(0.5, 0.05, min_top1=0.98, greedy_equal=True)),
    "q8_0": GgufQuant("LLAMA_FTYPE_MOSTLY_Q8_0", Thresholds.lossy(6.0, 0.6, min_top1=0.9)),
    "q6_k": GgufQuant("LLAMA_FTYPE_MOSTLY_Q6_K", Thresholds.lossy(12.0, 1.0, min_top1=0.85)),
    "q5_k_m": GgufQuant("LLAMA_FTYPE_MOSTLY_Q5_K_M", Thresholds.lossy(24.0, 2.0, min_top1=0.75)),
    "q4_k_m": GgufQuant("LLAMA_FTYPE_MOSTLY_Q4_K_M", Thresholds.lossy(24.0, 2.0, min_top1=0.75)),
    "q4_0": GgufQuant("LLAMA_FTYPE_MOSTLY_Q4_0", Thresholds.lossy(32.0, 3.5, min_top1=0.55)),
}
DEFAULT_GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")

# llama.cpp pre-tokenizer names tried for a byte-level BPE vocabulary, in order of preference when several match
# every probe: the plain GPT-2 split first, then the families whose regexes differ (digit grouping, CJK, ...).
# A name this llama.cpp build does not know fails to load and scores -1.
# fmt: off
PRE_TOKENIZER_CANDIDATES = (
    "gpt-2", "smollm", "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon",
    "starcoder", "refact", "command-r", "olmo", "dbrx", "stablelm2", "gpt-4o", "tekken", "bloom", "poro-chat",
    "viking", "jais", "exaone", "chameleon", "minerva-7b", "superbpe", "seed-coder", "default",
)
# fmt: on
# Our own metadata key: which edgedistill wrote the file.
EDGEDISTILL_VERSION_KEY = "edgedistill.version"
# Context of the llama.cpp instance that checks an artifact: the longest probe prompt plus the greedy tokens.
PARITY_CONTEXT = MAX_PROBE_TOKENS + GREEDY_TOKENS
# How that instance runs, recorded in the manifest (see _llama).
PARITY_RUNTIME = {"kv_cache": "f32", "flash_attention": False, "context": PARITY_CONTEXT}


@dataclass
class GgufVocab:
    """The tokenizer as GGUF stores it (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


# ------------------------------------------------------------------------------------------------- vocabulary


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """Convert a Hugging Face byte-level BPE tokenizer into GGUF vocabulary fields.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast``.
        vocab_size: rows of the model's embedding; ids the tokenizer leaves unused become ``[PADn]`` tokens of
            type UNUSED (as llama.cpp's converter does), so token count and embedding rows agree.

    Raises:
        EdgeDistillError: the tokenizer is not byte-level BPE or has more tokens than the embedding has rows.
    """
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgeDistillError("tokenizer: GGUF export needs a fast (tokenizers) tokenizer; this one is slow-only")
    spec = json.loads(backend.to_str())
    model_type = spec.get("model", {}).get("type")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if model_type != "BPE" or not byte_level:
        raise EdgeDistillError(
            f"tokenizer: GGUF export supports byte-level BPE tokenizers only (this one is "
            f"{model_type} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')})"
        )
    by_id = {index: text for text, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise EdgeDistillError(
            f"tokenizer: has token id {max(by_id)} but the model's embedding has only {vocab_size} rows"
        )
    added = {index: token for index, token in (tokenizer.added_tokens_decoder or {}).items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
        elif index in added:
            tokens.append(by_id[index])
            types.append(int(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[index])
            types.append(int(TokenType.NORMAL))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return GgufVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=template,
    )


# ---------------------------------------------------------------------------------------------------- writing


def check_exportable(config: Any) -> None:
    """Refuse Llama variants whose GGUF form we do not write, naming the field at fault."""
    if getattr(config, "model_type", None) != "llama":
        raise EdgeDistillError(f"model: model_type {getattr(config, 'model_type', None)!r} cannot be exported to GGUF")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            raise EdgeDistillError(f"model: config.{name} = True cannot be exported to GGUF (llama without biases)")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear"):
        raise EdgeDistillError(
            f"model: config.rope_scaling type {kind!r} cannot be exported to GGUF (supported: none, linear)"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise EdgeDistillError(
            f"model: config.hidden_act = {config.hidden_act!r} cannot be exported to GGUF (llama.cpp's llama uses silu)"
        )


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q or k projection from Hugging Face's rotate-half layout to llama.cpp's interleaved one.

    Hugging Face rotates the pair (i, i + d/2) of each head of dimension d; llama.cpp rotates (2i, 2i + 1). Rows
    ``[head, half, i]`` therefore move to ``[head, i, half]``.

    Args:
        weight: ``[heads * head_dim, in_features]``.
        heads: attention heads of this projection (key/value heads for k).

    Returns:
        An array of the same shape.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """The model's tensors under their GGUF names as float32 arrays, q/k permuted, tied output omitted."""
    import gguf

    config = model.config
    # A fresh map per export: gguf-py's TensorNameMap can update class-level state (FACTS.md).
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise EdgeDistillError(f"model: tensor {hf_name} has no llama GGUF name; cannot export it")
        kind, name = found
        array = tensor.detach().float().cpu().numpy()
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            array = permute_rotary(array, config.num_attention_heads)
        elif kind == gguf.MODEL_TENSOR.ATTN_K:
            array = permute_rotary(array, config.num_key_value_heads)
        yield name, np.ascontiguousarray(array)


def write_gguf(
    path: Path, model_config: Any, vocab: GgufVocab, pre: str, general: dict[str, Any], model: Any = None
) -> None:
    """Write a llama GGUF: metadata, vocabulary and, when ``model`` is given, its float32 tensors.

    Without ``model`` the file holds no tensors; llama.cpp loads such a file with ``vocab_only``, which is how
    pre-tokenizer candidates are probed.
    """
    import gguf

    config = model_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(general["name"])
    if general.get("license"):
        writer.add_license(general["license"])
    if general.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, general["base_model"])
    writer.add_description(general.get("description", ""))
    writer.add_string(EDGEDISTILL_VERSION_KEY, __version__)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(len(vocab.tokens))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for add, token_id in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_pad_token_id, vocab.pad_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    if model is not None:
        for name, array in llama_tensors(model):
            writer.add_tensor(name, array)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------------- llama.cpp


def _llama(path: Path, threads: int) -> LlamaCpp:
    """A llama.cpp instance of an artifact for the parity check.

    The KV cache is float32 and flash attention off (:data:`PARITY_RUNTIME`), so that the figures measure the file:
    llama.cpp's default float16 cache alone moves SmolLM2-135M's f32 logits by up to 0.05 (0.1 with flash
    attention), where the file itself differs from PyTorch by 1e-4.
    """
    return LlamaCpp(path, n_ctx=PARITY_CONTEXT, n_batch=PARITY_CONTEXT, threads=threads, f32_cache=True)


def llama_vocab(path: Path) -> LlamaCpp:
    """llama.cpp's tokenizer of a GGUF file, loaded without weights and without a context.

    Raises:
        EdgeDistillError: llama.cpp refused the file (for a vocabulary-only file: an unknown ``tokenizer.ggml.pre``).
    """
    return LlamaCpp(path, vocab_only=True)


def choose_pre_tokenizer(
    out: Path,
    model_config: Any,
    vocab: GgufVocab,
    general: dict[str, Any],
    probes: list[str],
    expected: list[list[int]],
) -> tuple[str, dict[str, int]]:
    """Score candidate ``tokenizer.ggml.pre`` names on the probe strings; return the best and every score.

    Candidates are tried in :data:`PRE_TOKENIZER_CANDIDATES` order until one matches every probe; when none
    does, the one with the most matches wins and the artifacts' tokenizer parity reports the mismatch. A name
    this llama.cpp does not know scores -1.
    """
    scores: dict[str, int] = {}
    for pre in PRE_TOKENIZER_CANDIDATES:
        path = temp_path(out, f"pre-{pre}.gguf")
        try:
            write_gguf(path, model_config, vocab, pre, general)
            try:
                vocab_file = llama_vocab(path)
            except EdgeDistillError:
                scores[pre] = -1
                continue
            with vocab_file:
                scores[pre] = count_equal(expected, [vocab_file.tokenize(text) for text in probes])
        finally:
            remove_path(path)
        if scores[pre] == len(probes):
            break
    best = max(scores, key=lambda name: (scores[name], -PRE_TOKENIZER_CANDIDATES.index(name)))
    return best, scores


def quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    """Quantize a float32 GGUF with llama.cpp's ``llama_model_quantize``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_QUANTS[quant].ftype)
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise EdgeDistillError(f"gguf: llama.cpp failed to quantize to {quant} (status {status})")


def run_llama(
    llm: LlamaCpp, prompt_ids: list[list[int]], greedy_prompts: int, greedy_tokens: int = GREEDY_TOKENS
) -> tuple[list[np.ndarray], list[list[int]]]:
    """llama.cpp's logits at every position of each prompt and greedy continuations of the first ones."""
    logits, greedy = [], []
    for index, ids in enumerate(prompt_ids):
        logits.append(llm.evaluate(ids, all_logits=True))
        if index >= greedy_prompts:
            continue
        tokens = [int(np.argmax(logits[-1][-1]))]
        while len(tokens) < greedy_tokens:
            tokens.append(int(np.argmax(llm.evaluate([tokens[-1]], start=len(ids) + len(tokens) - 1))))
        greedy.append(tokens)
    return logits, greedy


def llama_answers(
    path: Path,
    threads: int,
    prompt_ids: list[list[int]],
    greedy_prompts: int,
    probes: list[str],
    special_texts: list[str],
) -> tuple[list[np.ndarray], list[list[int]], list[list[int]], list[list[int]]]:
    """What llama.cpp makes of an artifact: logits and greedy tokens on the prompts, ids of the probe strings.

    Runs inside :func:`~edgedistill.isolate.run_isolated`, so it takes and returns plain data.
    """
    with _llama(path, threads) as llm:  # the loaded model's own tokenizer: no second load of the file
        logits, greedy = run_llama(llm, prompt_ids, greedy_prompts)
        probe_ids = [llm.tokenize(text) for text in probes]
        special_ids = [llm.tokenize(text, add_special=True) for text in special_texts]
    return logits, greedy, probe_ids, special_ids


def check_gguf(
    path: Path,
    quant: str,
    reference: Reference,
    probes: list[str],
    expected: list[list[int]],
    special_texts: list[str],
    special_expected: list[list[int]],
    threads: int,
) -> ParityReport:
    """Load an artifact in llama.cpp and judge it against the PyTorch reference and the Hugging Face ids.

    Args:
        path: the GGUF file.
        quant: its name in :data:`GGUF_QUANTS` (selects the thresholds).
        reference: PyTorch's answers on the probe prompts.
        probes: tokenizer probe strings, compared with nothing added.
        expected: the Hugging Face ids of ``probes``.
        special_texts: strings compared with BOS/EOS added as each tokenizer adds them.
        special_expected: the Hugging Face ids of ``special_texts`` with ``add_special_tokens=True``.
        threads: CPU threads for llama.cpp.
    """
    logits, greedy, probe_ids, special_ids = run_isolated(
        llama_answers,
        path,
        threads,
        reference.prompt_ids,
        len(reference.greedy),
        probes,
        special_texts,
        what=f"parity check of {path.name} in llama.cpp",
    )
    tokens = TokenizerProbes(probes, expected, special_texts, special_expected)
    return judge_answers(GGUF_QUANTS[quant].thresholds, reference, logits, greedy, tokens, probe_ids, special_ids)


# ------------------------------------------------------------------------------------------------------ format


@dataclass
class GgufPlan:
    """What a GGUF export decides before writing: the vocabulary, the metadata and the probed pre-tokenizer."""

    vocab: GgufVocab
    general: dict[str, Any]
    pre: str
    pre_scores: dict[str, int]
    pre_seconds: float


class GgufFormat(ExportFormat):
    """GGUF's part of the export skeleton (:func:`~edgedistill.export.formats.export_artifacts`): a llama GGUF
    written by gguf-py, quantized by llama.cpp and checked in llama.cpp."""

    name = "gguf"
    quants = GGUF_QUANTS
    default_quants = DEFAULT_GGUF_QUANTS
    base_quant = "f32"
    modules = ("gguf", "llama_cpp")
    tools = ("gguf", "llama-cpp-python", "torch", "transformers")
    converted = "wrote the float32 file"

    def artifact_name(self, model_name: str, quant: str) -> str:
        return f"{model_name}-{quant}.gguf"

    def prepare(self, job: ExportJob) -> GgufPlan:
        """Refuse what GGUF cannot hold, convert the vocabulary and choose ``tokenizer.ggml.pre`` by probing."""
        config, source = job.loaded.model.config, job.source
        check_exportable(config)
        vocab = vocab_from_tokenizer(job.loaded.tokenizer, config.vocab_size)
        general = {
            "name": source.name,
            "license": source.license,
            "base_model": source.base_model,
            "description": f"exported by edgedistill {__version__} from {source.path.name}",
        }
        probes = job.probes
        started = time.perf_counter()
        pre, scores = choose_pre_tokenizer(job.out, config, vocab, general, probes.strings, probes.expected)
        seconds = time.perf_counter() - started
        job.progress(
            f"gguf: tokenizer.ggml.pre = {pre!r}: {scores[pre]}/{len(probes.strings)} probe strings equal "
            f"({len(scores)} candidates tried in {seconds:.1f}s)"
        )
        return GgufPlan(vocab, general, pre, scores, seconds)

    def convert(self, job: ExportJob, plan: GgufPlan, base: Path) -> None:
        write_gguf(base, job.loaded.model.config, plan.vocab, plan.pre, plan.general, model=job.loaded.model)

    def derive(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> None:
        quantize(conversion.path, artifact, quant, job.threads)

    def check(self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path) -> ParityReport:
        p = job.probes
        return check_gguf(
            artifact, quant, job.reference, p.strings, p.expected, p.special_texts, p.special_expected, job.threads
        )

    def details(
        self, job: ExportJob, conversion: Conversion, quant: str, artifact: Path, parity_seconds: float
    ) -> dict[str, Any]:
        plan: GgufPlan = conversion.plan
        return {
            "tokenizer_pre": plan.pre,
            "tokenizer_pre_scores": plan.pre_scores,
            "llama_ftype": GGUF_QUANTS[quant].ftype,
            "parity_runtime": PARITY_RUNTIME,
            "conversion_seconds": round(conversion.seconds, 3),
            "pre_tokenizer_seconds": round(plan.pre_seconds, 3),
            "parity_seconds": round(parity_seconds, 3),
            "tools": conversion.tools,
        }


GGUF = GgufFormat()


# The skeleton run with GGUF, under the name callers know: export_gguf(source, loaded, quants, out, reference,
# probes, threads, progress) -> the checked artifacts, still under temporary names (see export_artifacts).
export_gguf = functools.partial(export_artifacts, GGUF)
