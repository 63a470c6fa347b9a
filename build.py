#!/usr/bin/env python3
"""python build.py --target docker|... [options]: the same as `gpubake build ...`."""

from gpubake.cli import build_main

if __name__ == "__main__":
    build_main()
