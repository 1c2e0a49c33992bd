#!/usr/bin/env bash
# Create (or reuse) .venv with psu-export and everything its tests need.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PSU_EXTRAS:-runtime,snntorch,nir,spikingjelly,norse,braincog,test,serve}
stamp=".venv/.psu-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU build of torch first (on this project's machines it is on local disk);
# a later resolver step then keeps it instead of pulling a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
# frameworks whose declared torchvision/torchaudio would pull a multi-GB torch (pyproject.toml)
.venv/bin/python -m pip install -q --no-deps "spikingjelly==2.0.0" "norse==1.1.0" "nirtorch==2.6" "braincog==0.2.7.19"
rm -f .venv/.psu-setup-*
touch "$stamp"
echo "setup: .venv ready (extras: ${EXTRAS})"
