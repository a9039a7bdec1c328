"""``edgedistill generate | chat | serve MODEL``: the functions the top-level CLI registers.

Each ``add_*_args`` declares a subcommand's arguments; each ``run_*`` checks them, loads the model and returns an
exit code. Bad input raises :class:`~edgedistill.errors.EdgeDistillError`, which the CLI prints in one line with
exit code 2. MODEL is a ``.gguf`` file, a ``.onnx`` file or an ONNX export directory holding ``model.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.text import check_utf8, decode_utf8

CHAT_COMMANDS = {"/reset": "forget the conversation", "/exit": "leave (also /quit or Ctrl-D)", "/help": "this list"}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a .gguf file, a .onnx file, or an ONNX export directory")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all this process may use)")
    parser.add_argument(
        "--context", type=int, default=None, help="tokens of prompt plus output (default: the model's, at most 2048)"
    )
    parser.add_argument(
        "--draft",
        default=None,
        metavar="PATH",
        help="a smaller model of the same vocabulary (e.g. its distilled student) that drafts tokens for MODEL to "
        "verify: speculative decoding, the same greedy output as MODEL alone, the same distribution when sampling",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help="tokens the draft proposes per round, 1-16 (default: adapted to how many MODEL accepts)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most new tokens (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = none (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random draws (default: a fresh one)")
    parser.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop before this text (repeatable)"
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options from the flags, checked before the model loads (a bad value fails fast)."""
    from edgedistill.runtime.sampling import SamplingParams

    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop or ()),
    }
    SamplingParams(**options)
    return options


def _load(args: argparse.Namespace) -> Any:
    from edgedistill.runtime import load

    if args.threads is not None and args.threads < 0:
        raise EdgeDistillError(f"--threads must be >= 0, got {args.threads}")
    return load(
        args.model,
        threads=args.threads or None,
        context=args.context,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
    )


# ---------------------------------------------------------------------------------------------------- generate


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """Declare ``generate MODEL PROMPT`` and its flags on ``parser``."""
    _add_model_args(parser)
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    _add_sampling_args(parser, max_tokens=128, temperature=0.0)
    parser.add_argument(
        "--chat", action="store_true", help="send PROMPT as a user message through the model's chat template"
    )
    parser.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def _read_stdin() -> str:
    """All of standard input, decoded as UTF-8 whatever the locale; bytes that are not UTF-8 are an error."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream with no bytes beneath it
        return sys.stdin.read()
    text = decode_utf8(buffer.read(), "prompt (standard input)")
    return text.replace("\r\n", "\n")  # as text-mode stdin reads it


def run_generate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the generated text on stdout as it is produced; 0 on success."""
    out = out or sys.stdout
    options = _sampling(args)
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    check_utf8(prompt, "prompt")  # before the model loads: argv bytes that are not UTF-8 arrive as surrogates
    with _load(args) as model:
        if args.chat:
            stream = model.chat_stream([{"role": "user", "content": prompt}], **options)
        else:
            stream = model.stream(prompt, **options)
        with stream:
            for piece in stream:
                out.write(piece)
                out.flush()
        out.write("\n")
        out.flush()
        if args.stats:
            done = stream.completion
            print(
                f"{done.prompt_tokens} prompt tokens in {done.prefill_seconds:.3f}s, {done.completion_tokens} new "
                f"tokens, {done.decode_tokens_per_second:.1f} tokens/s decoding, finish: {done.finish_reason} "
                f"({model.info.backend}, {model.info.threads} threads)",
                file=sys.stderr,
            )
            if done.speculative:
                spec = done.speculative
                print(
                    f"draft: {spec['accepted']}/{spec['drafted']} proposed tokens accepted in {spec['rounds']} "
                    f"rounds ({done.completion_tokens / max(spec['rounds'], 1):.2f} tokens per teacher evaluation)",
                    file=sys.stderr,
                )
    return 0


# -------------------------------------------------------------------------------------------------------- chat


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """Declare ``chat MODEL`` and its flags on ``parser``."""
    _add_model_args(parser)
    _add_sampling_args(parser, max_tokens=512, temperature=0.0)
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")


def _read_line(stdin: TextIO, what: str) -> str:
    """One line of ``stdin`` ('' at the end), decoded as UTF-8 line by line whatever the locale, so that bytes that
    are not UTF-8 are an error naming their line (a text stream would fail on a whole buffered chunk)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # a text stream with no bytes beneath it
        line = stdin.readline()
        check_utf8(line, what)
        return line
    return decode_utf8(buffer.readline(), what)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """An interactive conversation on the terminal, the reply streamed as it is generated; 0 on exit."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    options = _sampling(args)
    if args.system is not None:
        check_utf8(args.system, "--system")
    interactive = stdin.isatty()
    with _load(args) as model:
        if model.chat_template is None:
            raise EdgeDistillError(f"{args.model}: the model has no chat template; use `edgedistill generate`")
        opening = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(opening)
        info = model.info
        if interactive:
            print(
                f"{info.name} ({info.format}, {info.quantization}, {info.backend}, context {info.context}). "
                f"Commands: {', '.join(CHAT_COMMANDS)}.",
                file=out,
            )
        line_number = 0
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line_number += 1
            try:
                line = _read_line(stdin, f"standard input: line {line_number}")
            except KeyboardInterrupt:
                out.write("\n")
                return 0
            if not line:  # end of input
                return 0
            text = line.rstrip("\r\n")
            command = text.strip().lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                messages = list(opening)
                print("(conversation cleared)", file=out)
                continue
            if command == "/help":
                for name, meaning in CHAT_COMMANDS.items():
                    print(f"  {name:8} {meaning}", file=out)
                continue
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            try:
                stream = model.chat_stream(messages, **options)
            except EdgeDistillError as err:
                messages.pop()
                print(f"error: {err} (/reset starts over)", file=out)
                continue
            reply = []
            try:
                with stream:
                    for piece in stream:
                        reply.append(piece)
                        out.write(piece)
                        out.flush()
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
                out.write(" [interrupted]")
            out.write("\n")
            out.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})


# ------------------------------------------------------------------------------------------------------- serve


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Declare ``serve MODEL`` and its flags on ``parser``."""
    from edgedistill.runtime.server import DEFAULT_HOST, DEFAULT_PORT, ServerLimits

    limits = ServerLimits()
    _add_model_args(parser)
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--model-id", default=None, help="the model's name in the API (default: the file name)")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the context - 1)"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=limits.max_tokens,
        help=f"largest max_tokens a request may ask for, and the chat default (default {limits.max_tokens})",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=limits.max_body_bytes, help="largest request body (default 1 MiB)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=limits.max_queue,
        help=f"requests that may wait while one generates; more get 503 (default {limits.max_queue})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help=f"connections served at once (one thread each); more get 503 (default {limits.max_connections})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=limits.request_timeout_s,
        metavar="SECONDS",
        help="a request's line, headers and body must all arrive within this, else 408; also how long an idle "
        f"connection is kept (default {limits.request_timeout_s:g})",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="also answer requests whose Host header names NAME (repeatable; '*': any). Always answered: "
        "localhost, 127.0.0.1, [::1] and the --host address; --host 0.0.0.0 or :: answers any Host",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (visible to other users in ps; prefer "
        "--api-key-file or $EDGEDISTILL_API_KEY)",
    )
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the API key from this file (one line). Precedence: --api-key, then --api-key-file, then the "
        "environment variable EDGEDISTILL_API_KEY",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")


def run_serve(args: argparse.Namespace) -> int:
    """Serve the model until Ctrl-C; 0 on a clean stop."""
    from edgedistill.runtime.server import (
        ModelServer,
        ServerLimits,
        allowed_hosts_for,
        resolve_api_key,
        serve_forever,
    )

    if not 0 <= args.port <= 65535:
        raise EdgeDistillError(f"--port must lie in [0, 65535], got {args.port}")
    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
        request_timeout_s=args.request_timeout,
    )
    # Checked before the model loads, so that a missing key file fails at once.
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    allowed_hosts = allowed_hosts_for(args.host, args.allowed_host or ())
    with _load(args) as model:
        server = ModelServer(
            model, args.host, args.port, limits, model_id=args.model_id, api_key=api_key, allowed_hosts=allowed_hosts
        )
        server.verbose = args.verbose
        if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            print(
                f"warning: listening on {args.host} without an API key: anyone who can reach this port can use it",
                file=sys.stderr,
            )
        info = model.info
        draft = getattr(model, "draft", None)
        drafting = f", drafted by {Path(draft.info.path).name}" if draft is not None else ""
        print(
            f"serving {server.model_id} ({info.format} {info.quantization}, {info.backend}, {info.threads} threads, "
            f"context {info.context}{drafting}) at {server.url}/v1 (Ctrl-C stops)",
            flush=True,
        )
        serve_forever(server)
    return 0
