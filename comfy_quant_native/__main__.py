"""``python -m comfy_quant_native convert|inspect ...``: the comfy-quant command line."""

import sys

from .convert.cli import main

sys.exit(main())
