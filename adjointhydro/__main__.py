"""``python -m adjointhydro``: the command line (also ``torchrun ... -m adjointhydro train config.toml``)."""
import sys

from .cli import main

sys.exit(main())
