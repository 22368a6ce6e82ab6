"""`python -m factflip.cli`: the `factflip` command."""

from factflip.cli import main

main()
