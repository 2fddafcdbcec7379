"""``python -m kscu`` (and ``accelerate launch -m kscu``) run the CLI."""

import sys

from kscu.cli import main

sys.exit(main())
