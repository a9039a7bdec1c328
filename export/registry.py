"""The export formats ``edgedistill export`` knows: one entry per format, each an
:class:`~edgedistill.export.formats.ExportFormat` declared in its own module.

Adding a format is that module plus its entry here; the CLI's ``FORMAT`` choices, the ``--quant`` help and
validation, the dependency check and the export itself all read this registry. It is built once and never changes:
a caller that wants another set of formats builds its own (``FORMATS.plus(...)``) and passes it to
:func:`edgedistill.export.cli.export` or :func:`~edgedistill.export.cli.run`.
"""

from __future__ import annotations

from edgedistill.export.formats import FormatRegistry
from edgedistill.export.gguf import GGUF
from edgedistill.export.onnx import ONNX

FORMATS = FormatRegistry(GGUF, ONNX)
