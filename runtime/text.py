"""Text in and out of a model: the chat template, UTF-8-safe incremental detokenization and stop strings.

Shared by both backends, so that the same tokens give the same text whichever file they came from.
"""

from __future__ import annotations

import codecs
import functools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from edgedistill.errors import EdgeDistillError, one_line

CHAT_ROLES = ("system", "user", "assistant", "tool")


class IncrementalDecoder:
    """Turns token ids into text one token at a time without ever splitting a multi-byte character.

    A byte-level BPE token can end in the middle of a UTF-8 sequence (an emoji spans several tokens); the bytes
    wait here until the character is complete. Bytes that never form a valid character become U+FFFD, as a
    whole-sequence decode with ``errors="replace"`` would give.

    Args:
        token_bytes: the bytes of one token id (empty for control tokens that print nothing).
    """

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` completes (possibly empty)."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Whatever incomplete sequence is left, as replacement characters."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text, holding back only what could still be the start of one.

    Args:
        stops: the stop strings (non-empty).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return what may be emitted now, and whether a stop string was found.

        After a stop is found, the returned text is everything before it, and nothing more should be pushed.
        """
        if not self._stops:
            return text, False
        pending = self._pending + text
        found = -1
        for stop in self._stops:
            index = pending.find(stop)
            if index >= 0 and (found < 0 or index < found):
                found = index
        if found >= 0:
            self._pending = ""
            return pending[:found], True
        hold = self._partial_suffix(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """The held-back text, when the generation ends without a stop string."""
        pending, self._pending = self._pending, ""
        return pending

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# Bounds on rendering a chat template, which comes from the model file and so is untrusted code. The sandbox
# (Jinja's, as Hugging Face's apply_chat_template uses) already refuses attribute tricks and range() beyond 100,000
# items; these bound the rest. A real chat template renders a conversation in well under a millisecond.
MAX_RENDERED_CHARS = 1_000_000  # characters of prompt text (also bounds "x" * n and list * n)
MAX_RENDER_SECONDS = 2.0  # wall-clock time, so that nested loops that print nothing end too
MAX_POWER_BITS = 4096  # the size of an integer ** result: 7 ** 10000000000 would compute for hours
# The file name Jinja gives the code of a template compiled from a string; only those frames are timed.
_TEMPLATE_FILENAME = "<template>"


class _TemplateRefused(Exception):
    """``raise_exception(message)`` called by the template (Hugging Face's convention for unsupported input)."""


class _TemplateTooCostly(Exception):
    """The template ran past :data:`MAX_RENDER_SECONDS` or built something beyond the bounds above."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefused(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _bounded_environment_class() -> type:
    """Jinja's immutable sandbox with ``*`` and ``**`` checked before they run (which also keeps Jinja from folding
    them into constants at compile time, where they would run unchecked). Built on first use: jinja2 is imported
    only when a model has a chat template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                        if len(sequence) * count > MAX_RENDERED_CHARS:
                            raise _TemplateTooCostly(
                                f"repeating a sequence of {len(sequence)} items exceeds {MAX_RENDERED_CHARS} items"
                            )
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right * abs(left).bit_length() > MAX_POWER_BITS:
                    raise _TemplateTooCostly(
                        f"a power of a {abs(left).bit_length()}-bit integer exceeds {MAX_POWER_BITS} bits"
                    )
            return super().call_binop(context, operator, left, right)

    return BoundedEnvironment


def _bounded_environment() -> Any:
    # Hugging Face renders with trim_blocks and lstrip_blocks; templates are written for that.
    env = _bounded_environment_class()(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class _Deadline:
    """Raise :class:`_TemplateTooCostly` in template code that runs past ``seconds`` (a line tracer on the
    template's own frames, so that a loop that calls nothing and prints nothing is stopped as well)."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._end = 0.0
        self._previous: Any = None

    def __enter__(self) -> _Deadline:
        self._end = time.monotonic() + self._seconds
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)

    def _on_call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._on_line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def _on_line(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self._end:
            raise _TemplateTooCostly(f"rendering took more than {self._seconds:g} s")
        return self._on_line


def _template_line(err: BaseException) -> str:
    """``line N: `` for the innermost template frame in ``err``'s traceback (Jinja maps it to the source line)."""
    line = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}: " if line else ""


class ChatTemplate:
    """A model's Jinja chat template, rendered in a sandbox as Hugging Face's ``apply_chat_template`` does, with
    bounds on its output and its running time (:data:`MAX_RENDERED_CHARS`, :data:`MAX_RENDER_SECONDS`).

    Args:
        source: the template text (``chat_template.jinja`` of an ONNX export, ``tokenizer.chat_template`` of a GGUF).
        special_tokens: values such as ``bos_token`` and ``eos_token`` that templates refer to.
        origin: where the template comes from, for error messages (e.g. ``model.gguf: tokenizer.chat_template``).

    Raises:
        EdgeDistillError: the template does not compile, naming ``origin`` and the line.
    """

    def __init__(
        self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "chat template"
    ) -> None:
        from jinja2 import TemplateSyntaxError

        self.source = source
        self.origin = origin
        self._special = dict(special_tokens or {})
        try:
            self._template = _bounded_environment().from_string(source)
        except TemplateSyntaxError as err:
            raise EdgeDistillError(
                f"{origin}: does not compile (line {err.lineno}: {one_line(err.message or '')})"
            ) from None
        except Exception as err:  # any other failure of the compiler on untrusted text
            raise EdgeDistillError(f"{origin}: does not compile ({type(err).__name__}: {one_line(err)})") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (checked by :func:`check_messages`).

        Raises:
            EdgeDistillError: malformed messages, or the template failed on them (an error in its code, its own
                ``raise_exception``, or a bound exceeded), in one line naming the template's origin and line.
        """
        check_messages(messages)
        context = {
            "messages": [dict(message) for message in messages],
            "add_generation_prompt": add_generation_prompt,
            **self._special,
        }
        parts: list[str] = []
        size = 0
        try:
            with _Deadline(MAX_RENDER_SECONDS):
                for part in self._template.generate(**context):
                    size += len(part)
                    if size > MAX_RENDERED_CHARS:
                        raise _TemplateTooCostly(f"the prompt exceeds {MAX_RENDERED_CHARS} characters")
                    parts.append(part)
        except _TemplateRefused as err:
            raise EdgeDistillError(f"{self.origin}: refuses these messages ({one_line(err)})") from None
        except _TemplateTooCostly as err:
            raise EdgeDistillError(f"{self.origin}: stopped ({_template_line(err)}{err})") from None
        except RecursionError as err:
            raise EdgeDistillError(f"{self.origin}: stopped ({_template_line(err)}recursion too deep)") from None
        except Exception as err:  # the template is code from the model file: any error in it is the file's
            message = f"{_template_line(err)}{type(err).__name__}: {one_line(err)}"
            raise EdgeDistillError(f"{self.origin}: cannot render these messages ({message})") from None
        text = "".join(parts)
        check_utf8(text, f"{self.origin}: the rendered prompt")
        return text


def check_utf8(text: str, what: str) -> None:
    """Refuse a string that cannot be written as UTF-8: one holding a lone surrogate (U+D800 to U+DFFF).

    Python decodes bytes that are not UTF-8 in a command line (and, under a C locale, on stdin) into such
    surrogates rather than failing, so this is where invalid input bytes show up.

    Raises:
        EdgeDistillError: naming ``what`` and the first offending character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        hint = f", from the byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else ""
        raise EdgeDistillError(
            f"{what}: not valid UTF-8 (character {err.start} is the lone surrogate {char!r}{hint})"
        ) from None


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        EdgeDistillError: naming ``what`` and the offset of the first byte that is not UTF-8.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        byte = data[err.start : err.start + 1].hex()
        raise EdgeDistillError(f"{what}: not valid UTF-8 (byte 0x{byte} at offset {err.start})") from None


def check_messages(messages: Any) -> None:
    """Refuse anything but a non-empty list of ``{"role": str, "content": str}`` with a known role.

    Raises:
        EdgeDistillError: naming the message and the field at fault.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise EdgeDistillError("messages: must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EdgeDistillError(
                f"messages[{index}]: must be an object with 'role' and 'content', got {one_line(repr(message), 80)}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise EdgeDistillError(
                f"messages[{index}].role: must be one of {', '.join(CHAT_ROLES)}, got {one_line(repr(role), 80)}"
            )
        if not isinstance(content, str):
            raise EdgeDistillError(f"messages[{index}].content: must be a string, got {type(content).__name__}")
        check_utf8(content, f"messages[{index}].content")
