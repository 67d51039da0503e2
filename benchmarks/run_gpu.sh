#!/usr/bin/env bash
# One command for a CUDA machine: install, check, benchmark; every result lands in one folder.
#   bash benchmarks/run_gpu.sh [OUT_DIR]        (from the repository root; default benchmarks/results/<gpu>)
# On the lent GPU test machine, stage the missing wheels first (`../shared/tools/stage-gpu-wheels`),
# carry .gpu/base with this call; the DALI decode benchmark needs the .gpu/daliN pieces as well.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo none)
if [ "$gpu" = none ]; then echo "run_gpu.sh: no CUDA device visible; nothing to do" >&2; exit 1; fi
out=${1:-benchmarks/results/$gpu}
mkdir -p "$out"
if [ -d .gpu/base ]; then bash .gpu/base/gpu-install .gpu 2>&1 | tee "$out/install.txt"; fi
# a regular install: the machine has no network for an isolated build, and editable installs of
# the kernels/ mapping need a newer setuptools than it may have
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -n 2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
# step LOG CMD...: run CMD, keep its output in $out/LOG, remember a failure but go on
step() { local log=$1; shift; echo "== $*"; if ! "$@" 2>&1 | tee "$out/$log"; then echo "FAILED: $*"; status=1; fi; }
step gpu-tests.txt python3 -m pytest -q -m gpu tests
step kernel-tests.txt python3 -m pytest -q tests/test_fast_model.py tests/test_varlen_attention.py tests/test_scoring.py tests/test_packing.py
step varlen_attention.txt python3 benchmarks/bench_varlen_attention.py --out "$out/varlen_attention.json"
step scoring.txt python3 benchmarks/bench_scoring.py --out "$out/scoring.json"
step packing.txt python3 benchmarks/bench_packing.py --out "$out/packing.json"
step model.txt python3 benchmarks/bench_model.py --out "$out/model.json" --compile
step decode.txt python3 benchmarks/bench_decode.py --out "$out/decode.json"
step kernel_report.txt python3 -m stop_fast.kernels.compile_report --json "$out/kernel_report.json"
exit $status
