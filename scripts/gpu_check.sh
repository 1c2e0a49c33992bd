#!/usr/bin/env bash
# GPU checks on a lent CUDA machine (not part of CI): CUDA execution-provider parity and
# timings. Expects in /tmp/parts the onnxruntime-gpu package as an xz tarball split in parts
# (part*, each carried by one call: docs/ARCHITECTURE.md "GPU checks") and the snntorch
# wheel, both made by scripts/gpu_parts.sh. Writes its log to $OUT/gpu_check.log as it goes,
# and the result files (reports, tables, plots) into $OUT/gpu_results.tar.gz when it exits or
# is stopped by a TERM (only about eight files come back from a device call's $OUT).
# GPU_ALGOS=1 also runs benchmarks/cuda_algorithms.py on the exports in .gpu_models (its
# options in GPU_ALGOS_ARGS, e.g. "--time-steps 256 --models mlp").
set -uo pipefail
OUT=${OUT:-out/gpu}
RES=$(mktemp -d)
mkdir -p "$OUT" /tmp/site
exec > >(tee "$OUT/gpu_check.log") 2>&1
trap 'tar -czf "$OUT/gpu_results.tar.gz" -C "$RES" .' EXIT
trap 'exit 143' TERM
stamp() { echo "== $(date +%T) $*"; }
stamp "installing onnxruntime-gpu"
cat /tmp/parts/part* | xz -d | tar -x -C /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/parts/snntorch-*.whl || exit 1
# run psu_export from this checkout (models/ and converters/ install as its subpackages)
[ -e psu_export/models ] || ln -s ../models psu_export/models
[ -e psu_export/converters ] || ln -s ../converters psu_export/converters
# the CUDA and cuDNN libraries of the machine's pip packages, for onnxruntime's CUDA provider
nvlibs=$(python3 -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + '/nvidia/**/lib*.so*', recursive=True)})))")
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 LD_LIBRARY_PATH="$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c "import torch, onnxruntime as ort; print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('onnxruntime', ort.__version__, ort.get_available_providers())"
PSU="python3 -m psu_export.cli"
# 1. row blocks (psu_export/synaptic.py: the MLP's 784 x 1000 product over T x B >= 4,096 rows)
# on the CUDA provider against snnTorch's own run, T = 256, batch 32 (8,192 rows)
stamp "row blocks: parity on CUDA"
$PSU convert psu_export.models.ref_mlp:make_net /tmp/mlp_T256.onnx --time-steps 256 --input-shape 784 --no-verify 2>&1 | grep -A1 "^wrote"
$PSU verify psu_export.models.ref_mlp:make_net /tmp/mlp_T256.onnx --time-steps 256 --input-shape 784 --batch 32 --provider all --report "$RES/mlp_row_blocks_parity_T256_b32.json" 2>&1 | tail -8
echo "exit mlp T=256 batch 32 verify: ${PIPESTATUS[0]}"
# 2. the exact-algorithm experiment on pre-exported files (optional)
if [ "${GPU_ALGOS:-0}" = 1 ]; then
  stamp "cuda_algorithms"
  timeout 150 python3 benchmarks/cuda_algorithms.py run .gpu_models ${GPU_ALGOS_ARGS:-} --out "$RES" 2>&1 | grep -v -i warning
fi
# 3. the GPU tests (CUDA-graph replay parity), and `verify` on CUDA of the --cuda-graph builds of the
# bundled digits model and of the reference models, whose layers run in waves (psu_export/wavefront.py);
# GPU_TESTS=0 skips them
if [ "${GPU_TESTS:-1}" = 1 ]; then
  stamp "pytest (GPU tests)"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py -k cuda_graph_replay 2>&1 | tail -3
  $PSU convert psu_export.models.digits:make_net --weights models/digits_snn.pt /tmp/digits_graph.onnx --time-steps 16 --input-shape 64 --cuda-graph --batch 4 --no-verify
  $PSU verify psu_export.models.digits:make_net --weights models/digits_snn.pt /tmp/digits_graph.onnx --time-steps 16 --provider all --report "$RES/digits_cuda_graph_parity.json" | tail -4
  echo "exit digits --cuda-graph verify: ${PIPESTATUS[0]}"
  stamp "reference models' --cuda-graph builds: parity at T = 64"
  for spec in "mlp 784" "convnet 1,28,28"; do
    set -- $spec
    for b in 1 32; do
      $PSU convert psu_export.models.ref_$1:make_net /tmp/$1_graph_b$b.onnx --time-steps 64 --input-shape $2 --cuda-graph --batch $b --no-verify 2>&1 | grep -A1 "^wrote"
      $PSU verify psu_export.models.ref_$1:make_net /tmp/$1_graph_b$b.onnx --time-steps 64 --input-shape $2 --provider all --report "$RES/$1_cuda_graph_parity_b$b.json" 2>&1 | grep "^Parity"
      echo "exit $1 --cuda-graph batch $b verify: ${PIPESTATUS[0]}"
    done
  done
fi
# 4. the benchmark suite with the CUDA provider (includes the --cuda-graph build); GPU_BENCH=0 skips it
stamp "suite"
if [ "${GPU_BENCH:-1}" = 1 ]; then PYTHON=python3 OUT="$RES/bench" bash benchmarks/gpu_check.sh; fi
stamp "done"
