#!/usr/bin/env bash
# Set everything up, then run the test suite (pass pytest options through, e.g. -k snntorch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
