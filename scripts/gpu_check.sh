#!/usr/bin/env bash
# GPU checks on a lent CUDA machine (not part of CI): CUDA execution-provider parity and
# timings. Expects the onnxruntime-gpu wheel (split in five parts, each carried by one call
# and copied to /tmp/parts) and the snntorch wheel in /tmp/parts; writes under $OUT.
set -uo pipefail
FINAL=${OUT:-out/gpu}
OUT=/tmp/gpu_results
mkdir -p "$OUT" "$FINAL"
log="$OUT/gpu_check.log"
exec > >(tee "$log") 2>&1
wheel=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/parts/part00 /tmp/parts/part01 /tmp/parts/part02 /tmp/parts/part03 /tmp/parts/part04 > "$wheel"
md5sum "$wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" /tmp/parts/snntorch-*.whl || exit 1
# run psu_export from this checkout (models/ and converters/ install as its subpackages)
[ -e psu_export/models ] || ln -s ../models psu_export/models
[ -e psu_export/converters ] || ln -s ../converters psu_export/converters
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 - <<'PY'
import torch, onnxruntime as ort
print("torch", torch.__version__, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
PY
PSU="python3 -m psu_export.cli"
# 1. parity on the CUDA provider: bundled digits model, a conv net (init_hidden style), PSU reset modes
$PSU convert psu_export.models.digits:make_net --weights models/digits_snn.pt "$OUT/digits.onnx" --time-steps 16 --input-shape 64 --no-verify
$PSU verify psu_export.models.digits:make_net --weights models/digits_snn.pt "$OUT/digits.onnx" --time-steps 16 --provider all --report "$OUT/digits_parity_gpu.json"
echo "exit digits verify: $?"
$PSU verify psu_export.models.digits:make_net --weights models/digits_snn.pt "$OUT/digits.onnx" --time-steps 16 --provider cuda --data models/digits_test.npz --report "$OUT/digits_parity_gpu_data.json"
echo "exit digits verify (data, cuda): $?"
for mode in psu stochastic; do
  $PSU convert psu_export.models.digits:make_net --weights models/digits_snn.pt "$OUT/digits_$mode.onnx" --time-steps 16 --input-shape 64 --reset $mode --seed 3 --no-verify
  $PSU verify psu_export.models.digits:make_net --weights models/digits_snn.pt "$OUT/digits_$mode.onnx" --time-steps 16 --provider all --report "$OUT/digits_${mode}_gpu.json"
  echo "exit $mode verify: $?"
done
rm -f "$OUT"/*.onnx "$OUT"/*.onnx.data
# 2. timings with the CUDA provider (benchmark suite); GPU_BENCH=0 skips them
if [ "${GPU_BENCH:-1}" = 1 ]; then PYTHON=python3 OUT="$OUT/bench" bash benchmarks/gpu_check.sh; fi
ls -la "$OUT"
# at most 8 files come back from the device: one archive plus the log
tar czf "$FINAL/gpu_results.tgz" -C "$OUT" .
cp "$log" "$FINAL/"
