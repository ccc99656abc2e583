"""`python scripts/esm2_batch.py ...`: the esm2-batch command, as the seed ran it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esm2_batch.cli import app

if __name__ == "__main__":
    app(prog_name="esm2-batch")
