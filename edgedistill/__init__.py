"""edgedistill: distil a language model into a small student, export it, run it on the edge and measure it.

The stages are installed as sub-packages: ``edgedistill.distill``, ``edgedistill.export``, ``edgedistill.runtime``
and ``edgedistill.bench``. Importing this package imports none of them.
"""

__version__ = "0.1.0"

from edgedistill.errors import EdgeDistillError

__all__ = ["EdgeDistillError", "__version__"]
