"""``python -m fabrik``: the same command line as ``fabrik``."""

import sys

from fabrik.entrypoints.cli import main

sys.exit(main())
