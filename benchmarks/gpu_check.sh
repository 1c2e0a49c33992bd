#!/usr/bin/env bash
# GPU check for issue 5 (run by the lead on a lent H100/H200; < 5 min).
# Prerequisite: onnxruntime-gpu installed in place of the CPU wheel (same import folder), e.g.
#   python3.12 -m pip uninstall -y onnxruntime && python3.12 -m pip install onnxruntime-gpu
# Runs the suite with the CUDA provider at T=64, batch 1 and 32 (target: >= 10x over the naive
# export at batch 1), and writes results_cuda.{json,md,png} plus logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3.12}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import snntorch, onnxscript, click, rich" 2>&1 || "$PY" -m pip install -q snntorch onnxscript click rich matplotlib 2>&1 | tail -2
} > "$OUT/gpu_env.txt" 2>&1
cat "$OUT/gpu_env.txt"
# the models/ folder installs as psu_export.models: make it importable without installing
[ -e psu_export/models ] || ln -s ../models psu_export/models
[ -e psu_export/converters ] || ln -s ../converters psu_export/converters
timeout 240 "$PY" benchmarks/run_suite.py --provider cuda --time-steps 64 --batch 1,32 --cache "" --out "$OUT" 2>&1 \
  | grep --line-buffered -v -i warning | tee "$OUT/gpu_suite.log"
echo "exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_suite.log"
