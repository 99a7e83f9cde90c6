"""`python -m cadence` is the `cadence` command."""

from cadence.cli import main

main()
