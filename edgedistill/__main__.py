"""``python -m edgedistill`` (and ``torchrun -m edgedistill``) run the CLI."""

import sys

from edgedistill.cli import main

sys.exit(main())
