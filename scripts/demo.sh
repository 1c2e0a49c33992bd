#!/usr/bin/env bash
# Set everything up, then convert and verify the bundled default model (snnTorch, digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/psu-export convert psu_export.models.digits:make_net --weights models/digits_snn.pt out/digits.onnx \
  --time-steps 16 --input-shape 64 --report out/digits_parity.json "$@"
.venv/bin/psu-export verify psu_export.models.digits:make_net --weights models/digits_snn.pt out/digits.onnx \
  --time-steps 16 --data models/digits_test.npz --report out/digits_parity_data.json --raster out/digits_raster.png
