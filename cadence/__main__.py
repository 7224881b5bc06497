"""``python -m cadence`` runs the CLI."""

from cadence.cli import main

main()
