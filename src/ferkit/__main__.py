"""`python -m ferkit ...`: the same CLI as the `ferkit` command, for trees run from source (PYTHONPATH=src)."""

from ferkit.cli import main

main()
