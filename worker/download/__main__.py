"""`python -m worker.download`: the download command (what `chatqueue-worker download` runs)."""

import sys

from worker.download.cli import main

sys.exit(main())
