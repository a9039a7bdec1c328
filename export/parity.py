"""What every exporter checks its artifact against: probe prompts, tokenizer probe strings, the PyTorch reference
and the comparison of logits, greedy tokens and token ids.

The exporters (``gguf.py``, ``onnx.py``) run their artifact on the same inputs and hand the numbers to
:func:`judge` together with the thresholds that sit next to them. Everything here but :func:`torch_reference`
works on numpy arrays and plain lists, so that a test can recompute a manifest's figures independently.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Prompts whose next-token logits are compared at every position. Plain text, code, numbers and a chat turn,
# because quantization errors show differently on each.
PROBE_PROMPTS = [
    "The capital of France is",
    "Knowledge distillation trains a small student model to imitate a large teacher. The main benefit is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Monday, 3 March 2025: the temperature rose from 12.5 to 19 degrees, and 1,024 people",
    "Once upon a time, in a small village by the sea, there lived",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and oxygen. It takes place in",
    "1. Preheat the oven to 180 °C.\n2. Mix the flour, the sugar and two eggs.\n3.",
    "La tour Eiffel est située à Paris, et elle mesure environ",
    "Q: If a train travels 60 km in 45 minutes, what is its average speed in km/h?\nA:",
    '{"name": "Ada Lovelace", "born": 1815, "known_for": [',
]
# A chat conversation rendered through the tokenizer's chat template becomes one more probe prompt.
PROBE_CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_PROBE_TOKENS = 64
GREEDY_TOKENS = 32
# Greedy continuations are compared on the first prompts only: each costs 32 sequential decode steps.
GREEDY_PROMPTS = 3
MIN_PROBE_STRINGS = 200
# Lossy formats round activations to 8 bits in blocks (llama.cpp's q8 dot products, onnxruntime's dynamic int8). A
# position where one channel carries a "massive activation" (hundreds to thousands, against tens elsewhere) loses
# the rest of its block to that rounding, and that one position's logits can be off by the logits' own size while
# every other position is fine. Measured on the demo's derived `small` (2026-12-04), per-position largest
# difference over 265 probe positions: q8_0 median 0.51, 99th percentile 2.27, one position 27.5 (a channel at
# 993 after layer 10; 17,480 on the first token); q4_k_m 1.89 / 10.5 / 36.6. A broken export is off everywhere
# (q/k in the wrong layout: mean 5.3, top-1 0.57), so the lossy formats' bound on the largest difference holds for
# all but 1 % of positions, and the true largest difference is still reported.
ACTIVATION_OUTLIERS = 0.01


@dataclass(frozen=True)
class Thresholds:
    """What an artifact must meet to pass parity. Each exporter declares one per quantization, with its reason.

    Attributes:
        max_logit_diff: the largest absolute difference between the artifact's and PyTorch's logits, over every
            probe position and vocabulary entry.
        max_mean_logit_diff: bound on the mean absolute difference over the same entries. For 4-bit weights the
            largest difference is of the logits' own size even when the export is right; the mean still
            separates a quantized model from a broken one.
        min_top1: the smallest share of probe positions at which the artifact's argmax equals PyTorch's.
        greedy_equal: whether the 32 greedy tokens must equal PyTorch's on every greedy prompt (lossless formats).
        outlier_share: the share of probe positions whose largest difference may exceed ``max_logit_diff``
            (:data:`ACTIVATION_OUTLIERS` for the lossy formats, 0 for the lossless ones).
    """

    max_logit_diff: float
    max_mean_logit_diff: float
    min_top1: float
    greedy_equal: bool
    outlier_share: float = 0.0

    def __post_init__(self) -> None:
        if not self.max_logit_diff > 0:
            raise ValueError(f"max_logit_diff must be positive, got {self.max_logit_diff!r}")
        if not 0 < self.max_mean_logit_diff <= self.max_logit_diff:
            raise ValueError(f"max_mean_logit_diff must lie in (0, max_logit_diff], got {self.max_mean_logit_diff!r}")
        if not 0 <= self.min_top1 <= 1:
            raise ValueError(f"min_top1 must lie in [0, 1], got {self.min_top1!r}")
        if not 0 <= self.outlier_share < 0.5:
            raise ValueError(f"outlier_share must lie in [0, 0.5), got {self.outlier_share!r}")

    @classmethod
    def lossy(cls, max_logit_diff: float, max_mean_logit_diff: float, min_top1: float) -> Thresholds:
        """A lossy format's: greedy text may differ, and 1 % of positions may exceed ``max_logit_diff``."""
        return cls(max_logit_diff, max_mean_logit_diff, min_top1, greedy_equal=False, outlier_share=ACTIVATION_OUTLIERS)


@dataclass
class Reference:
    """PyTorch's answers on the probe prompts: the prompt ids, their logits and the greedy continuations.

    Attributes:
        prompt_ids: token ids of each probe prompt (what the Hugging Face tokenizer gives, specials included).
        logits: float32 array ``[len(ids), vocab]`` per prompt.
        greedy: ``GREEDY_TOKENS`` greedily chosen ids after each of the first ``GREEDY_PROMPTS`` prompts.
    """

    prompt_ids: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]


@dataclass
class ParityReport:
    """An artifact's parity figures as they go into the manifest."""

    max_logit_diff: float
    positions_over_max: int  # probe positions whose largest difference exceeds the threshold's max_logit_diff
    mean_logit_diff: float
    top1_agreement: float
    positions: int
    greedy_equal: bool | None
    greedy_tokens_matching: int | None
    greedy_tokens_total: int | None
    tokenizer_matches: int
    tokenizer_total: int
    specials_equal: bool | None
    thresholds: dict[str, Any]
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_prompt_ids(tokenizer: Any, max_positions: int) -> list[list[int]]:
    """The probe prompts (and the chat prompt, when the tokenizer has a template) as token ids, each cut to
    ``MAX_PROBE_TOKENS`` and to the model's context."""
    texts = list(PROBE_PROMPTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True))
    limit = max(8, min(MAX_PROBE_TOKENS, max_positions - GREEDY_TOKENS - 1))
    ids = []
    for text in texts:
        # A chat rendering already holds its special tokens; plain text gets what the tokenizer adds (BOS or not).
        token_ids = tokenizer(text, add_special_tokens=text in PROBE_PROMPTS)["input_ids"]
        ids.append(list(token_ids[:limit]))
    return ids


def probe_strings(tokenizer: Any = None) -> list[str]:
    """At least ``MIN_PROBE_STRINGS`` strings on which a converted tokenizer must give the Hugging Face ids.

    Digits and numbers, runs of spaces, tabs and newlines, punctuation and contractions, accented Latin and other
    scripts, CJK, emoji (with modifiers and joiners), code, and, when ``tokenizer`` is given, its special tokens
    alone, inside text and in a rendered chat conversation.
    """
    strings = _text_probes()
    if tokenizer is not None:
        strings += _special_token_probes(tokenizer)
    # Keep the order (the manifest counts refer to it) but drop repeats.
    return list(dict.fromkeys(strings))


def _text_probes() -> list[str]:
    """The probe strings that do not depend on the tokenizer, in their fixed order."""
    # fmt: off
    numbers = ["0", "7", "42", "123", "1234", "12345", "1234567", "1234567890", "3.14159", "-42", "+7", "0.001",
               "1,000,000", "1 000 000", "2024-01-15", "12:30:59", "0x1F", "0b1010", "1e-5", "6.02e23", "99.9%",
               "$100", "€9,99", "v1.2.3", "+1 (555) 123-4567", "a1b2c3", "Room 101", "3rd", "21st", "1/2",
               "x²+y³", "½ ¼", "٣٤٥", "一二三", "１２３", "007", "10000000000000000000"]
    punctuation = ["Hello, world!", "...", "?!", "!!!", "—", "–", "(a) [b] {c}", "@#$%^&*", "a/b\\c", "~`|", "<>",
                   "<<=", "!==", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "don't", "I'M", "WE'LL", "it’s",
                   "«quoted»", "“curly”", "'single'", "\"double\"", "a.b.c", "e.g.", "U.S.A.", "#hashtag",
                   "@user", "foo_bar", "--flag", "*bold*", "__init__", ";;", "::", "->", "=>", "&&", "||"]
    latin = ["café", "naïve", "résumé", "Ångström", "Zürich", "São Paulo", "Łódź", "Dvořák", "ñandú", "façade",
             "İstanbul", "straße", "ÆØÅ", "crème brûlée", "CAFÉ", "Ünïcödé", "piñata", "jalapeño", "Čeština",
             "Ελληνικά", "Привет, мир", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "Tiếng Việt"]
    cjk = ["你好世界", "日本語のテキスト", "한국어 문장", "東京タワー", "GPT模型", "ＡＢＣ１２３", "中文，标点。",
           "漢字かなカナ", "これは「テスト」です", "大模型蒸馏", "北京 2024 年", "汉字123abc"]
    emoji = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖 robot", "a😀b", "✨✨", "🔥🔥🔥", "😂😂", "🙏🏻 thanks",
             "⚡️", "👩‍💻", "☕"]
    words = ["The quick brown fox", "hello", "Hello", "HELLO", " hello", "hello world", "distillation",
             "antidisestablishmentarianism", "a", "I", "A B C", "x", "ok"]
    # fmt: on
    strings = numbers + _whitespace_probes() + punctuation + latin + cjk + emoji + _CODE_PROBES + words
    # Joins of two kinds at once, where pre-tokenizers disagree most: numbers next to letters, spaces before
    # digits, punctuation after CJK, emoji inside words.
    for left, right in itertools.product(["abc", "汉字", "😀", " "], ["123", "  4", ".", "\n5"]):
        strings.append(left + right)
    return strings


def _whitespace_probes() -> list[str]:
    """Runs of spaces, tabs, newlines and CRLFs, alone and between, before and after text."""
    spaces = []
    for count in (1, 2, 3, 4, 5, 8, 16):
        spaces += [" " * count, "a" + " " * count + "b", " " * count + "lead", "trail" + " " * count]
    for char, counts in (("\t", (1, 2, 3)), ("\n", (1, 2, 3, 4)), ("\r\n", (1, 2))):
        for count in counts:
            spaces += [char * count, "a" + char * count + "b", char * count + "x" + char * count]
    spaces += [" \n ", "\n \n", " \t \n", "\t \t", "a \n\n b", "end.\n\n\nStart", "\u00a0nbsp", "a\u3000b", "\v\f"]
    return spaces


_CODE_PROBES = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'if __name__ == "__main__":\n\tmain()',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    '<div class="x">Hello</div>',
    "SELECT * FROM users WHERE id = 42;",
    "ls -la | grep '.py' > out.txt",
    "x = [i**2 for i in range(10) if i % 2]",
    "import numpy as np\nnp.zeros((3, 4))",
    "#include <stdio.h>\nint main() { return 0; }",
    "const f = async (a) => await g(a);",
    "r'^\\d{3}-\\d{4}$'",
    "| col1 | col2 |\n|------|------|\n| 1    | 2    |",
    "\\frac{a}{b} + \\sqrt{x^2}",
    "    indented    code\n        deeper",
    "# comment\n\n\n\nx=1",
    "fn main() -> Result<(), Box<dyn Error>> {}",
    "<think>\nstep one\n</think>\n<answer>42</answer>",
]


def _special_token_probes(tokenizer: Any) -> list[str]:
    """The tokenizer's special and added tokens alone, inside text and together, and a rendered chat."""
    strings = []
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [t for t in _added_tokens(tokenizer) if t not in specials]
    for token in specials:
        strings += [token, f"text{token}more", f" {token} ", f"{token}\n{token}"]
    if len(specials) >= 2:
        strings.append("".join(specials))
    if getattr(tokenizer, "chat_template", None):
        chat = [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "2+2=?  Réponds."},
            {"role": "assistant", "content": "4 😀\n\ndone"},
        ]
        for rendered in (
            tokenizer.apply_chat_template(chat, tokenize=False),
            tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True),
        ):
            strings.append(rendered)
    return strings


def _added_tokens(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [token.content for _, token in sorted(decoder.items())]


def hf_token_ids(tokenizer: Any, strings: list[str]) -> list[list[int]]:
    """The Hugging Face tokenizer's ids for each string, special tokens parsed, nothing added."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in strings]


@dataclass
class TokenizerProbes:
    """The strings every artifact's tokenizer is compared on, and the Hugging Face ids it must give.

    Attributes:
        strings: the probe strings (:func:`probe_strings`), compared with nothing added.
        expected: the Hugging Face ids of ``strings``.
        special_texts: the probe prompts, compared with BOS/EOS added as each tokenizer adds them.
        special_expected: the Hugging Face ids of ``special_texts`` with ``add_special_tokens=True``.
    """

    strings: list[str]
    expected: list[list[int]]
    special_texts: list[str]
    special_expected: list[list[int]]

    @classmethod
    def of(cls, tokenizer: Any, strings: list[str]) -> TokenizerProbes:
        """The Hugging Face tokenizer's answers on ``strings`` and on :data:`PROBE_PROMPTS`."""
        special_texts = list(PROBE_PROMPTS)
        return cls(
            strings=strings,
            expected=hf_token_ids(tokenizer, strings),
            special_texts=special_texts,
            special_expected=[list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in special_texts],
        )


def count_equal(expected: list[list[int]], actual: list[list[int]]) -> int:
    """How many of the token-id lists are identical."""
    return sum(1 for a, b in zip(expected, actual, strict=True) if list(a) == list(b))


def compare_logits(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float, float, int]:
    """Largest and mean absolute logit difference and top-1 agreement over all probe positions.

    Args:
        reference: per prompt, float array ``[positions, vocab]`` (PyTorch).
        candidate: per prompt, float array of the same shape (the artifact).

    Returns:
        ``(max_abs_diff, mean_abs_diff, top1_agreement, positions)``; the mean is over every position and
        vocabulary entry.
    """
    max_diff, total_diff, entries, agree, positions = 0.0, 0.0, 0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref = np.asarray(ref, dtype=np.float32)
        cand = np.asarray(cand, dtype=np.float32)
        if ref.shape != cand.shape:
            raise ValueError(f"logits shape {cand.shape} differs from the reference's {ref.shape}")
        diff = np.abs(ref.astype(np.float64) - cand)
        max_diff = max(max_diff, float(diff.max()))
        total_diff += float(diff.sum())
        entries += diff.size
        agree += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
        positions += ref.shape[0]
    return max_diff, total_diff / entries, agree / positions, positions


def position_max_diffs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> np.ndarray:
    """The largest absolute logit difference at each probe position, all prompts concatenated: ``[positions]``."""
    return np.concatenate(
        [
            np.abs(np.asarray(ref, dtype=np.float64) - np.asarray(cand, dtype=np.float32)).max(-1)
            for ref, cand in zip(reference, candidate, strict=True)
        ]
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two sequences share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def judge(
    thresholds: Thresholds,
    reference: Reference,
    logits: list[np.ndarray],
    greedy: list[list[int]] | None,
    tokenizer_matches: int,
    tokenizer_total: int,
    specials_equal: bool | None = None,
) -> ParityReport:
    """Compare an artifact's answers with the reference and decide whether it passes.

    Args:
        thresholds: the exporter's thresholds for this quantization.
        reference: PyTorch's answers.
        logits: the artifact's logits on ``reference.prompt_ids``.
        greedy: the artifact's greedy continuations, or None when they were not computed.
        tokenizer_matches: probe strings on which the artifact's tokenizer gives the Hugging Face ids.
        tokenizer_total: probe strings tried.
        specials_equal: whether the artifact's tokenizer adds BOS/EOS exactly as the Hugging Face one does on the
            probe prompts (None: not checked).
    """
    max_diff, mean_diff, top1, positions = compare_logits(reference.logits, logits)
    failures = []
    over = int(np.sum(~(position_max_diffs(reference.logits, logits) <= thresholds.max_logit_diff)))
    allowed = int(thresholds.outlier_share * positions)
    if over > allowed:
        failures.append(
            f"max |logit diff| {max_diff:.4g} > {thresholds.max_logit_diff}"
            + (f" at {over} of {positions} positions (at most {allowed} may be)" if allowed else "")
        )
    if not mean_diff <= thresholds.max_mean_logit_diff:
        failures.append(f"mean |logit diff| {mean_diff:.4g} > {thresholds.max_mean_logit_diff}")
    if top1 < thresholds.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {thresholds.min_top1}")
    greedy_equal = matching = total = None
    if greedy is not None:
        matching = sum(common_prefix(r, g) for r, g in zip(reference.greedy, greedy, strict=True))
        total = sum(len(r) for r in reference.greedy)
        greedy_equal = all(list(r) == list(g) for r, g in zip(reference.greedy, greedy, strict=True))
        if thresholds.greedy_equal and not greedy_equal:
            failures.append(f"greedy tokens differ from PyTorch's ({matching}/{total} before the first difference)")
    if tokenizer_matches != tokenizer_total:
        failures.append(
            f"tokenizer differs from Hugging Face's on {tokenizer_total - tokenizer_matches} "
            f"of {tokenizer_total} probe strings"
        )
    if specials_equal is False:
        failures.append("tokenizer differs from Hugging Face's on the probe prompts with special tokens added")
    return ParityReport(
        max_logit_diff=max_diff,
        positions_over_max=over,
        mean_logit_diff=mean_diff,
        top1_agreement=top1,
        positions=positions,
        greedy_equal=greedy_equal,
        greedy_tokens_matching=matching,
        greedy_tokens_total=total,
        tokenizer_matches=tokenizer_matches,
        tokenizer_total=tokenizer_total,
        specials_equal=specials_equal,
        thresholds=asdict(thresholds),
        passed=not failures,
        failures=failures,
    )


def judge_answers(
    thresholds: Thresholds,
    reference: Reference,
    logits: list[np.ndarray],
    greedy: list[list[int]] | None,
    probes: TokenizerProbes,
    probe_ids: list[list[int]],
    special_ids: list[list[int]],
) -> ParityReport:
    """:func:`judge` an artifact's logits and greedy tokens, and its tokenizer's ids on ``probes.strings``
    (``probe_ids``) and on ``probes.special_texts`` with specials added (``special_ids``)."""
    specials = count_equal(probes.special_expected, special_ids)
    return judge(
        thresholds,
        reference,
        logits,
        greedy,
        count_equal(probes.expected, probe_ids),
        len(probes.strings),
        specials_equal=specials == len(probes.special_texts),
    )


def torch_reference(
    model: Any, prompt_ids: list[list[int]], greedy_prompts: int = GREEDY_PROMPTS, greedy_tokens: int = GREEDY_TOKENS
) -> Reference:
    """PyTorch's logits on every probe prompt and its greedy continuations of the first ``greedy_prompts``.

    Greedy decoding here never stops at EOS: 32 tokens are always compared.
    """
    import torch

    logits, greedy = [], []
    with torch.inference_mode():
        for index, ids in enumerate(prompt_ids):
            out = model(torch.tensor([ids]), use_cache=index < greedy_prompts)
            logits.append(out.logits[0].float().numpy().copy())
            if index >= greedy_prompts:
                continue
            past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
            while len(tokens) < greedy_tokens:
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            greedy.append(tokens)
    return Reference(prompt_ids=prompt_ids, logits=logits, greedy=greedy)
