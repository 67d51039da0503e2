#!/usr/bin/env bash
# One command for a CUDA machine: install, check, benchmark; every result lands in one folder.
#   bash benchmarks/run_gpu.sh [OUT_DIR]        (from the repository root; default benchmarks/results/<gpu>)
# On the lent GPU test machine, stage the missing wheels first (`../shared/tools/stage-gpu-wheels`),
# carry .gpu/base with this call; the DALI decode benchmark needs the .gpu/daliN pieces as well.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo none)
if [ "$gpu" = none ]; then echo "run_gpu.sh: no CUDA device visible; nothing to do" >&2; exit 1; fi
out=$(realpath -m "${1:-benchmarks/results/$gpu}")
mkdir -p "$out"
if [ -d .gpu/base ]; then bash .gpu/base/gpu-install .gpu 2>&1 | tee "$out/install.txt"; fi
# A regular install (the machine has no network for an isolated build, and editable installs of the
# kernels/ mapping need a newer setuptools than it may have). Everything then runs from a scratch
# folder, so `import stop_fast` finds the installed package, kernels included, not the source tree.
python3 -m pip install -q --no-deps --no-build-isolation "$repo" 2>&1 | tail -n 2
work=$(mktemp -d)
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
# step LOG CMD...: run CMD in the scratch folder, keep its output in $out/LOG, remember a failure, go on
step() { local log=$1; shift; echo "== $*"; if ! (cd "$work" && "$@") 2>&1 | tee "$out/$log"; then echo "FAILED: $*"; status=1; fi; }
step gpu-tests.txt python3 -m pytest -q -m gpu "$repo/tests"
step kernel-tests.txt python3 -m pytest -q "$repo/tests/test_fast_model.py" "$repo/tests/test_varlen_attention.py" \
    "$repo/tests/test_scoring.py" "$repo/tests/test_packing.py"
step varlen_attention.txt python3 "$repo/benchmarks/bench_varlen_attention.py" --out "$out/varlen_attention.json"
step scoring.txt python3 "$repo/benchmarks/bench_scoring.py" --out "$out/scoring.json"
step packing.txt python3 "$repo/benchmarks/bench_packing.py" --out "$out/packing.json"
step model.txt python3 "$repo/benchmarks/bench_model.py" --out "$out/model.json" --compile
step decode.txt python3 "$repo/benchmarks/bench_decode.py" --out "$out/decode.json"
step kernel_report.txt python3 -m stop_fast.kernels.compile_report --json "$out/kernel_report.json"
exit $status
