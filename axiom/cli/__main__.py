"""`python -m axiom.cli`: the same as the `axiom` command (torchrun uses this form)."""

import sys

from axiom.cli import main

sys.exit(main())
