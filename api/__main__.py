"""`python -m api` runs the `carbonx` command line with the network `serve`."""

from api.cli import main

main()
