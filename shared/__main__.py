"""`python -m tuneloop` is the `tuneloop` command."""

from .tools.cli import main

main()
