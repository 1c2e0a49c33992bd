#!/usr/bin/env bash
# Set everything up, then run the test suite (pass pytest options through, e.g. -k snntorch;
# -n 0 runs it in one process, for -s or --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one pytest-xdist worker per core, each test file on one worker (module fixtures run once),
# files handed out in the order tests/conftest.py gives them (slow files first)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile --no-loadscope-reorder "$@"
