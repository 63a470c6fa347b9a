#!/usr/bin/env bash
# Fetch, into .whl/, the wheels gpubake needs on a GPU host that has Python 3.12
# and PyTorch but no network (the lent H100/H200: Ubuntu 24.04, click, Jinja2,
# PyYAML and packaging already there): ansible-core and what it needs. .whl/ is
# git-ignored: name it in the device run's carry.
# There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and
# PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH; then e.g.
#   python3 build.py --target local --check --os ubuntu-24.04 --var cuda=13.0
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(ansible-core==2.19.14 resolvelib==1.2.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -l .whl
