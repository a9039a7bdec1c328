"""The one exception type that reaches a user as a message rather than a traceback."""


class EdgeDistillError(Exception):
    """Bad input or an unmet requirement, stated in one line that names the file, line or field at fault.

    Library code raises it; the CLI prints ``edgedistill: error: <message>`` and exits with code 2.
    """
