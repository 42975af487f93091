"""Entry point of ``python -m sequencer``."""

import sys

from sequencer.cli import main

sys.exit(main())
