"""python -m gpubake: the same as the gpubake command."""

from gpubake.cli import main

main()
