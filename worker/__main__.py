"""``python -m worker`` runs the ``bonewatch`` command line."""

from worker.cli import app

app(prog_name="bonewatch")
