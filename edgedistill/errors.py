"""The one exception type that reaches a user as a message rather than a traceback."""


class EdgeDistillError(Exception):
    """Bad input or an unmet requirement, stated in one line that names the file, line or field at fault.

    Library code raises it; the CLI prints ``edgedistill: error: <message>`` and exits with code 2.
    """


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed, cut to ``limit`` characters: what an error
    message quotes from a file or a library, so that the message stays one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
