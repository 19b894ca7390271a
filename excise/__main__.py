"""``python -m excise`` runs the command line."""

import sys

from excise.cli import main

sys.exit(main())
