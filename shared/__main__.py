"""`python -m tuneloop` is the `tuneloop` command."""

from .cli import main

main()
