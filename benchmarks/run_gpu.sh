#!/usr/bin/env bash
# stop_fast on a CUDA machine: GPU tests and the benchmark suite, step by step, each step under a
# time limit, everything packed into ONE archive in OUT after every step (a run that is cut off still
# leaves what finished).
#
#   bash benchmarks/run_gpu.sh [--dry-run] OUT [STEP ...]          (from anywhere; OUT is created)
#
# Steps, run in the order given (default: tests kernel-tests kernels model scaling decode):
#   tests      every test marked `gpu` (bf16, real shapes, the model's fast path against its reference)
#   kernel-tests  the kernel test files' other tests, which run on CUDA tensors where there is a GPU
#              (many shapes, each autotuned once: minutes)
#   kernels    benchmarks of attention alone, scoring and packing      (run.py --only attention,scoring,packing)
#   model      whole model, ViT-B/32 then ViT-B/16, every variant       (run.py --only model)
#   model-b32  / model-b16: one backbone only
#   scaling    step time against T, rho and batch                      (run.py --only scaling)
#   only       run.py --only "$STOP_FAST_ONLY" (any case ids or globs, e.g. 'model/ViT-B-32/*compiled*')
#   train      the full training step with and without the loader (bench_train.py: fast compiled
#              and eager, ViT-B/32, T = 12, B = 32; PyAV workers, or DALI where it imports)
#   decode     clips/s of PyAV, DALI CPU and DALI GPU (NVDEC); skipped when nvidia.dali does not import
# STOP_FAST_RUN_ARGS adds arguments to every run.py call (e.g. --profile: a kernel-time breakdown of
# each model case in its record and log).
# Before the first step the script checks the environment and stages the package (idempotent):
# `stop_fast/` with `kernels/` copied in as `stop_fast/kernels`, in a scratch folder first on
# PYTHONPATH, so the checked-out code runs as installed without installing anything. Steps run from
# that scratch folder, with PYTHONUNBUFFERED=1, and log to logs/STEP.log.
#
# OUT receives: stop_fast_gpu.tgz (results.json with every benchmark case, logs/, tests/*.xml,
# env.txt, decode.json), results.json and summary.txt. Results accumulate in the scratch folder
# ($STOP_FAST_WORK, default ${TMPDIR:-/tmp}/stop_fast_gpu), so a second call on the same machine adds
# to the first; `python benchmarks/report.py A.json B.json --json merged.json --md t.md --png p.png`
# merges the results of separate machines.
#
# Your CUDA machine: activate the environment that has torch (with CUDA), open_clip_torch, pytest
# (and, as you like, pytest-benchmark, av, matplotlib, nvidia-dali), or name its interpreter; then
#   PYTHON=.venv/bin/python STOP_FAST_TIME_PERCENT=400 bash benchmarks/run_gpu.sh benchmarks/results/h100
# runs every step. Time limits are sized for a lent machine's 10-minute calls: STOP_FAST_TIME_PERCENT
# scales them and run.py's budgets (400: four times as long; 0: no limits at all).
#
# The lent GPU test machine (torch 2.11, triton 3.6, Python 3.12; no network, no .git, few files
# back, 10 minutes a call): stage its missing wheels first (`../shared/tools/stage-gpu-wheels` from
# the project root writes .gpu/), then make two calls back to back, each carrying `.gpu/base` (the
# setup installs it offline when open_clip is missing) and naming the commit:
#   call 1 (at most ~5.5 min): STOP_FAST_COMMIT=<sha> bash benchmarks/run_gpu.sh $OUT tests kernels
#   call 2 (at most ~6.5 min): STOP_FAST_COMMIT=<sha> bash benchmarks/run_gpu.sh $OUT model scaling
# On a machine still warm from call 1 the second call finds the install and call 1's results and adds
# to them; otherwise merge the two results.json: `python benchmarks/report.py a.json b.json --json
# merged.json --md table.md --png plot.png`. The CPU tests and the sm_90 compile report are CI's job
# and are not rerun here.
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/run_gpu.sh [--dry-run] OUT [STEP ...]   (steps: tests kernel-tests kernels model model-b32 model-b16 scaling only train decode)" >&2
  exit 2
fi
out_arg=$1; shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests kernel-tests kernels model scaling decode)

# Seconds per step at STOP_FAST_TIME_PERCENT=100; the benchmark steps give run.py a budget 20 s shorter,
# so it skips the cases it could not finish instead of being killed in the middle of one.
declare -A limit=([setup]=120 [tests]=140 [kernel-tests]=240 [kernels]=130 [model]=290 [model-b32]=200 [model-b16]=150
                  [scaling]=60 [only]=300 [train]=100 [decode]=150)
for s in "${steps[@]}"; do
  if [ -z "${limit[$s]:-}" ] || [ "$s" = setup ]; then
    echo "run_gpu.sh: unknown step '$s' (steps: tests kernel-tests kernels model model-b32 model-b16 scaling only train decode)" >&2
    exit 2
  fi
done
scale=${STOP_FAST_TIME_PERCENT:-100}
case "$scale" in (*[!0-9]*|'') echo "run_gpu.sh: STOP_FAST_TIME_PERCENT must be a whole number, got '$scale'" >&2; exit 2;; esac
seconds_for() { echo $(( ${limit[$1]} * scale / 100 )); }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${STOP_FAST_WORK:-${TMPDIR:-/tmp}/stop_fast_gpu}
if [ $dry_run = 1 ]; then out=$out_arg
else out=$(mkdir -p "$out_arg" 2>/dev/null && cd "$out_arg" && pwd) || { echo "run_gpu.sh: cannot create OUT '$out_arg'" >&2; exit 2; }
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the commit measured: STOP_FAST_COMMIT (a tree without .git), else what git says (run.py asks it too)
commit=${STOP_FAST_COMMIT:-$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo "unknown: set STOP_FAST_COMMIT")}
export PYTHONPATH="$work/pkg${PYTHONPATH:+:$PYTHONPATH}"

run_py=("$PY" "$repo/benchmarks/run.py" --device cuda --append --out "$work/results.json")
read -r -a extra_run_args <<<"${STOP_FAST_RUN_ARGS:-}"
run_py+=("${extra_run_args[@]}")
kernel_tests=()
for f in test_varlen_attention.py test_attention.py test_scoring.py test_packing.py; do
  [ -f "$repo/tests/$f" ] && kernel_tests+=("$repo/tests/$f")
done
# pytest from the scratch folder against the repository's tests and settings, writing nothing there
pytest_args=(-q -rfEs -p no:cacheprovider -c "$repo/pytest.ini" --rootdir "$repo")

# run CMD... within the step's deadline ($deadline, epoch seconds; no limit when the scale is 0);
# with --dry-run only print it
limited() {
  if [ $dry_run = 1 ]; then echo "    $(printf '%q ' "$@")"; return 0; fi
  echo "+ $*"
  if [ "$scale" = 0 ]; then "$@"; return; fi
  local left=$(( deadline - $(date +%s) ))
  if [ $left -le 5 ]; then echo "no time left in this step for: $*"; return 124; fi
  timeout -k 10 "$left" "$@"
}

# one step: its commands share the step's time limit; returns the first failure's status
run_step() {
  local budget=(--budget-s $(( $(seconds_for "$1") * 9 / 10 - 10 ))) rc=0
  [ "$scale" = 0 ] && budget=(--budget-s 1000000)
  case $1 in
    tests)  # every `gpu` test (bf16, real shapes)
      # the model's and training's GPU tests first, then the kernels' (most numerous), then the rest
      local first=() f
      for f in test_fast_model.py test_train_loop.py test_scoring.py test_packing.py test_varlen_attention.py; do
        [ -f "$repo/tests/$f" ] && first+=("$repo/tests/$f")
      done
      limited "$PY" -m pytest "${pytest_args[@]}" --junitxml="$work/tests/gpu.xml" --continue-on-collection-errors \
        -m gpu "${first[@]}" "$repo/tests" || rc=$?
      [ $rc = 5 ] && rc=0 ;;  # pytest: no test selected
    kernel-tests)  # the kernel files' other tests, on CUDA tensors here
      if [ ${#kernel_tests[@]} -gt 0 ]; then
        limited "$PY" -m pytest "${pytest_args[@]}" --junitxml="$work/tests/kernels.xml" -m "not gpu" "${kernel_tests[@]}" || rc=$?
        [ $rc = 5 ] && rc=0
      fi ;;
    kernels)   limited "${run_py[@]}" --only attention,scoring,packing "${budget[@]}" || rc=$? ;;
    model)     limited "${run_py[@]}" --only model "${budget[@]}" || rc=$? ;;
    model-b32) limited "${run_py[@]}" --only model/ViT-B-32 "${budget[@]}" || rc=$? ;;
    model-b16) limited "${run_py[@]}" --only model/ViT-B-16 "${budget[@]}" || rc=$? ;;
    scaling)   limited "${run_py[@]}" --only scaling "${budget[@]}" || rc=$? ;;
    only)
      if [ -z "${STOP_FAST_ONLY:-}" ]; then echo "step only: set STOP_FAST_ONLY to case ids or globs"; rc=2
      else limited "${run_py[@]}" --only "$STOP_FAST_ONLY" "${budget[@]}" || rc=$?; fi ;;
    train)     limited "$PY" "$repo/benchmarks/bench_train.py" --variants fast-compiled,fast-eager \
                 --steps 10 --warmup 3 --out "$work/train.json" || rc=$? ;;
    decode)
      if [ $dry_run = 1 ] || "$PY" -c "import nvidia.dali" 2>/dev/null; then
        limited "$PY" "$repo/benchmarks/bench_decode.py" --out "$work/decode.json" || rc=$?
      else
        echo "decode: nvidia.dali does not import here; skipped (bench_decode.py alone measures PyAV)"
      fi ;;
  esac
  return $rc
}

if [ $dry_run = 1 ]; then
  echo "repo $repo; scratch $work; OUT $out; python $PY; commit $commit; time limits at ${scale}% (0: none)"
  echo "setup (up to $(seconds_for setup)s): check torch + CUDA and imports; install $repo/.gpu/base offline if open_clip is missing; stage the package in $work/pkg"
  total=$(seconds_for setup)
  for s in "${steps[@]}"; do
    t=$(seconds_for "$s"); total=$((total + t))
    echo "step $s (limit ${t}s):"
    run_step "$s"
  done
  echo "at most ${total}s in all"
  exit 0
fi

mkdir -p "$work/logs" "$work/tests"
summary=$work/summary.txt
pack() {  # the scratch folder but the staged package, atomically, into OUT; with results.json and the summary
  tar -czf "$out/stop_fast_gpu.tgz.tmp" -C "$work" --exclude=./pkg . 2>/dev/null && mv "$out/stop_fast_gpu.tgz.tmp" "$out/stop_fast_gpu.tgz"
  cp "$summary" "$out/summary.txt" 2>/dev/null
  if [ -f "$work/results.json" ]; then cp "$work/results.json" "$out/results.json"; fi
  return 0
}
note() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$summary"; }

setup() {
  deadline=$(( $(date +%s) + $(seconds_for setup) ))
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "run_gpu.sh: '$PY' has no torch with a visible CUDA device (set PYTHON=path/to/python)" >&2; return 1
  fi
  if ! "$PY" -c "import open_clip, av" 2>/dev/null && [ -f "$repo/.gpu/base/gpu-install" ]; then
    echo "installing the staged wheels offline ($repo/.gpu/base)"
    (cd "$repo" && limited bash .gpu/base/gpu-install .gpu)
  fi
  local missing
  missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "triton": "triton", "open_clip": "open_clip_torch", "safetensors": "safetensors",
        "tqdm": "tqdm", "pytest": "pytest"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
  )
  if [ -n "$missing" ]; then
    echo "run_gpu.sh: missing Python packages: $missing (pip install them, or stage .gpu/ wheels)" >&2; return 1
  fi
  rm -rf "$work/pkg" && mkdir -p "$work/pkg"
  if ! { cp -r "$repo/stop_fast" "$work/pkg/" && rm -rf "$work/pkg/stop_fast/kernels" \
         && cp -r "$repo/kernels" "$work/pkg/stop_fast/kernels"; }; then
    echo "run_gpu.sh: cannot stage the package from $repo" >&2; return 1
  fi
  find "$work/pkg" -name __pycache__ -prune -exec rm -rf {} +
  (cd "$work" && {
    nvidia-smi || true
    "$PY" - <<'EOF'
import os, platform, torch, triton, stop_fast, stop_fast.kernels
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print("stop_fast from", os.path.dirname(stop_fast.__file__))
for name in ("open_clip", "av", "nvidia.dali", "numpy", "pytest_benchmark", "matplotlib"):
    try:
        print(name, __import__(name, fromlist=["__version__"]).__version__)
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__)
EOF
  }) >"$work/env.txt" 2>&1
  local rc=$?
  cat "$work/env.txt"
  return $rc
}

cd "$work" || exit 2
note "commit $commit; steps: ${steps[*]}"
deadline=0
setup 2>&1 | tee "$work/logs/setup.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then note "setup FAILED (see logs/setup.log)"; pack; exit 1; fi
note "setup ok"
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  pytest_args+=(-o "addopts=-ra")  # pytest.ini's --benchmark-disable needs that plugin
fi
pack
status=0
for s in "${steps[@]}"; do
  start=$(date +%s)
  deadline=$(( start + $(seconds_for "$s") ))
  run_step "$s" 2>&1 | tee "$work/logs/$s.log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  if [ "$rc" = 0 ]; then note "step $s ok (${took}s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note "step $s TIMED OUT after ${took}s (what finished is kept)"; status=1
  else note "step $s FAILED, status $rc (${took}s; see logs/$s.log)"; status=1; fi
  pack
done
note "done: $out/stop_fast_gpu.tgz"
pack
exit $status
