#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a lent GPU machine, here (minutes, mostly xz):
# the onnxruntime-gpu package for the machine's python3.12, tar'd, xz-compressed and split
# into parts of at most 58 MiB in ignored folders .gpu1, .gpu2, ... (one per `run` call:
# a call carries at most 64 MiB, the checkout included), the snntorch wheel beside part 1,
# and, with arguments, the exports of benchmarks/cuda_algorithms.py in .gpu_models:
#
#   bash scripts/gpu_parts.sh                                   # parts only
#   bash scripts/gpu_parts.sh --time-steps 256 --models mlp     # and .gpu_models (cuda_algorithms prepare)
#
# Then, per part k: run(carry=[".gpuk"], "mkdir -p /tmp/parts && cp .gpuk/* /tmp/parts/"),
# the last call also carrying .gpu_models and running scripts/gpu_check.sh
# (docs/ARCHITECTURE.md, "GPU checks").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ORT_GPU=${ORT_GPU:-onnxruntime-gpu}   # e.g. onnxruntime-gpu==1.31.1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -qxF '.gpu*' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '.gpu*' >> .git/info/exclude; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 "$ORT_GPU" -d "$work"
"$PY" -m pip download -q --no-deps snntorch==1.0.0 -d "$work"
mkdir "$work/site"
"$PY" -m zipfile -e "$work"/onnxruntime_gpu-*.whl "$work/site"
echo "gpu_parts: compressing $(du -sh "$work/site" | cut -f1) (xz -9, a few minutes)"
tar -C "$work/site" -c . | xz -9 -T0 > "$work/ort.tar.xz"
rm -rf .gpu[0-9]*
split -b 58M -d -a 1 "$work/ort.tar.xz" "$work/part"
parts=("$work"/part?)
for i in "${!parts[@]}"; do
  mkdir ".gpu$((i + 1))"
  mv "${parts[$i]}" ".gpu$((i + 1))/"
done
cp "$work"/snntorch-*.whl .gpu1/
if [ $# -gt 0 ]; then
  rm -rf .gpu_models
  "$PY" benchmarks/cuda_algorithms.py prepare .gpu_models "$@"
fi
du -sh .gpu[0-9]* .gpu_models 2>/dev/null
echo "gpu_parts: ${#parts[@]} parts ($(basename "$(ls "$work"/onnxruntime_gpu-*.whl)"))"
