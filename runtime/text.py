"""Text in and out of a model: the chat template, UTF-8-safe incremental detokenization and stop strings.

Shared by both backends, so that the same tokens give the same text whichever file they came from.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from edgedistill.errors import EdgeDistillError

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


def _raise_exception(message: str) -> None:
    raise EdgeDistillError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's Jinja chat template, rendered in a sandbox as Hugging Face's ``apply_chat_template`` does.

    Args:
        source: the template text (``chat_template.jinja`` of an ONNX export, ``tokenizer.chat_template`` of a GGUF).
        special_tokens: values such as ``bos_token`` and ``eos_token`` that templates refer to.

    Raises:
        EdgeDistillError: the template does not compile.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Hugging Face renders with trim_blocks and lstrip_blocks; templates are written for that.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._special = dict(special_tokens or {})
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise EdgeDistillError(f"chat template: does not compile ({err})") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (checked by :func:`check_messages`)."""
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special,
            )
        except EdgeDistillError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as err:
            message = f"{type(err).__name__}: {err}"
            raise EdgeDistillError(f"chat template: cannot render these messages ({message})") from None


def check_messages(messages: Any) -> None:
    """Refuse anything but a non-empty list of ``{"role": str, "content": str}`` with a known role.

    Raises:
        EdgeDistillError: naming the message and the field at fault.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise EdgeDistillError("messages: must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EdgeDistillError(f"messages[{index}]: must be an object with 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise EdgeDistillError(f"messages[{index}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise EdgeDistillError(f"messages[{index}].content: must be a string, got {type(content).__name__}")
