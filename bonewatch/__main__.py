"""``python -m bonewatch`` runs the ``bonewatch`` command line."""

from bonewatch.worker.cli import main

main()
