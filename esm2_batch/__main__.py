"""`python -m esm2_batch` runs the esm2-batch command."""

from esm2_batch.cli import app

app(prog_name="esm2-batch")
