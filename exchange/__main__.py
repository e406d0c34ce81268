"""`python -m exchange` runs the `carbonx` command line."""

from exchange.cli import main

main()
