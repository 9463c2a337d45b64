"""`python -m gpupanel` runs the command line."""

import sys

from gpupanel.cli import main

sys.exit(main())
