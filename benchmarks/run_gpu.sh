#!/usr/bin/env bash
# stop_fast on a CUDA machine: GPU tests and the benchmark suite, step by step, each step under a
# time limit, everything packed into ONE archive in OUT after every step (a run that is cut off still
# leaves what finished).
#
#   bash benchmarks/run_gpu.sh [--dry-run] OUT [STEP ...]          (from anywhere; OUT is created)
#
# Steps, run in the order given (default: nvdec decode train targets, 790 s of limits with the setup;
# on a lent machine in two calls, below):
#   nvdec      is NVDEC usable here (python -m stop_fast.data.nvdec: ldconfig, libnvcuvid,
#              cuvidGetDecoderCaps): seconds, first, so a machine without it is known before DALI's
#              four-part install is spent on it; the answer in nvdec.json
#   dali       install the staged DALI wheel's pieces carried in this call (.gpu/daliN), once NVDEC is
#              there; DALI is assembled and installed when the last piece arrives
#   targets    issue 17's targets in one run at one commit: ViT-B/32 and ViT-B/16, B = 32, T = 12,
#              bf16, inference and training step of the compiled fast path, open_clip as shipped,
#              open_clip tuned and padded STOP + SDPA, compiled; each (model, mode) timed interleaved
#              (run.py --only 'model/*/fast_compiled/*,model/*/openclip_compiled/*,...')
#   tests      every test marked `gpu` (bf16, real shapes, the model's fast path against its reference)
#   kernel-tests  the kernel test files' other tests, which run on CUDA tensors where there is a GPU
#              (many shapes, each autotuned once: minutes)
#   kernels    benchmarks of attention alone, scoring and packing      (run.py --only attention,scoring,packing)
#   model      whole model, ViT-B/32 then ViT-B/16, every variant       (run.py --only model; the budget
#              cuts what does not fit, least important first)
#   model-b32  / model-b16: one backbone only
#   scaling    step time against T, rho and batch                      (run.py --only scaling)
#   only       run.py --only "$STOP_FAST_ONLY" (any case ids or globs, e.g. 'model/ViT-B-32/*compiled*')
#   train      the full training step on `stop-fast prepare`'s copies (bench_train.py: fast compiled,
#              ViT-B/32, T = 12, B = 32): without the loader, with it, and the loader alone; with 16
#              PyAV workers, and again with DALI (NVDEC) where DALI imports and NVDEC decodes; train-*.json
#   decode     clips/s per format x decoder (bench_decode.py: PyAV, torchcodec/decord where installed,
#              DALI GPU with 1 and several pipelines where DALI imports); decode.json
# STOP_FAST_RUN_ARGS adds arguments to every run.py call (e.g. --profile: a kernel-time breakdown of
# each model case in its record and log).
# Before the first step the script checks the environment and stages the package (idempotent):
# `stop_fast/` with `kernels/` copied in as `stop_fast/kernels`, in a scratch folder first on
# PYTHONPATH, so the checked-out code runs as installed without installing anything. Steps run from
# that scratch folder, with PYTHONUNBUFFERED=1, and log to logs/STEP.log.
#
# OUT receives: stop_fast_gpu.tgz (results.json with every benchmark case, logs/, tests/*.xml,
# env.txt, nvdec.json, decode.json, train-*.json), results.json and summary.txt. Results accumulate in the scratch folder
# ($STOP_FAST_WORK, default ${TMPDIR:-/tmp}/stop_fast_gpu), so a second call on the same machine adds
# to the first; `python benchmarks/report.py A.json B.json --json merged.json --md t.md --png p.png`
# merges the results of separate machines.
#
# The commit and the working tree's state are recorded with every case: from git where the checkout
# has .git; a copy without .git must be told both, as git says them where the copy was made:
#   bash benchmarks/run_gpu.sh --provenance      (on the machine with .git; prints the two settings)
#   STOP_FAST_COMMIT=<sha> STOP_FAST_DIRTY=<1|0> bash benchmarks/run_gpu.sh OUT ...
# (STOP_FAST_DIRTY=1: the copy has uncommitted changes to tracked files). Without them the script stops.
#
# Your CUDA machine: activate the environment that has torch (with CUDA), open_clip_torch, pytest
# (and, as you like, pytest-benchmark, av, matplotlib, nvidia-dali), or name its interpreter; then
#   PYTHON=.venv/bin/python STOP_FAST_TIME_PERCENT=400 bash benchmarks/run_gpu.sh benchmarks/results/h100 \
#     targets tests kernel-tests kernels model scaling train decode
# runs every step. Time limits are sized for a lent machine's 10-minute calls (no step over 540 s, so
# the setup and any one step fit in a call): STOP_FAST_TIME_PERCENT scales them and run.py's budgets
# (400: four times as long; 0: no limits at all).
#
# The lent GPU test machine (torch 2.11, triton 3.6, Python 3.12; no network, no .git, few files
# back, 10 minutes a call): stage its missing wheels first (`../shared/tools/stage-gpu-wheels` from
# the project root writes .gpu/), then make the calls back to back, each carrying `.gpu/base` (the
# setup installs it offline when open_clip is missing) and naming the commit and tree state that
# `--provenance` printed here:
#   call 1 (at most 6.5 min: setup 60 s + 20 + 90 + 220 s) : ... bash benchmarks/run_gpu.sh $OUT nvdec decode train
#   call 2 (at most 8 min: setup 60 s + 420 s):             ... bash benchmarks/run_gpu.sh $OUT targets
# (the data path's measurements first, then the speed targets; `...` is the STOP_FAST_COMMIT and
# STOP_FAST_DIRTY settings). Where call 1's nvdec.json says NVDEC decodes and time is left, DALI comes
# in four more back-to-back calls, each carrying one .gpu/daliN and running the `dali` step (the last
# installs it), then `decode train` again measures NVDEC. On a machine still warm from a call the next
# finds the install and the results and adds to them; otherwise merge the results.json of several
# calls: `python benchmarks/report.py a.json b.json --json merged.json --md table.md --png plot.png`.
# The CPU tests and the sm_90 compile report are CI's job and are not rerun here; `tests` (140 s) and
# the other steps take calls of their own.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
all_steps="nvdec dali targets tests kernel-tests kernels model model-b32 model-b16 scaling only train decode"

# what git says of the checkout: "STOP_FAST_COMMIT=<sha> STOP_FAST_DIRTY=<1|0>" (dirty: uncommitted
# changes to tracked files, as run.py's own check), or nothing where there is no .git
git_provenance() {
  local sha changes
  sha=$(git -C "$repo" rev-parse HEAD 2>/dev/null) || return 1
  changes=$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null) || return 1
  echo "STOP_FAST_COMMIT=$sha STOP_FAST_DIRTY=$([ -n "$changes" ] && echo 1 || echo 0)"
}
if [ "${1:-}" = "--provenance" ]; then
  git_provenance || { echo "run_gpu.sh: $repo is not a git checkout" >&2; exit 2; }
  exit 0
fi

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/run_gpu.sh [--dry-run] OUT [STEP ...]   (steps: $all_steps)" >&2
  echo "       bash benchmarks/run_gpu.sh --provenance        (STOP_FAST_COMMIT and STOP_FAST_DIRTY of this checkout)" >&2
  exit 2
fi
out_arg=$1; shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(nvdec decode train targets)

# Seconds per step at STOP_FAST_TIME_PERCENT=100, none over 540 (the setup and one step fit in a
# 10-minute call); the benchmark steps give run.py a budget of 90% less 10 s, so it skips the cases
# it could not finish instead of being killed in the middle of one.
declare -A limit=([setup]=60 [nvdec]=20 [dali]=120 [targets]=420 [tests]=140 [kernel-tests]=240 [kernels]=130
                  [model]=540 [model-b32]=400 [model-b16]=400 [scaling]=90 [only]=460 [train]=220 [decode]=90)
for s in "${steps[@]}"; do
  if [ -z "${limit[$s]:-}" ] || [ "$s" = setup ]; then
    echo "run_gpu.sh: unknown step '$s' (steps: $all_steps)" >&2
    exit 2
  fi
done
scale=${STOP_FAST_TIME_PERCENT:-100}
case "$scale" in (*[!0-9]*|'') echo "run_gpu.sh: STOP_FAST_TIME_PERCENT must be a whole number, got '$scale'" >&2; exit 2;; esac
seconds_for() { echo $(( ${limit[$1]} * scale / 100 )); }

work=${STOP_FAST_WORK:-${TMPDIR:-/tmp}/stop_fast_gpu}
if [ $dry_run = 1 ]; then out=$out_arg
else out=$(mkdir -p "$out_arg" 2>/dev/null && cd "$out_arg" && pwd) || { echo "run_gpu.sh: cannot create OUT '$out_arg'" >&2; exit 2; }
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the commit measured and the tree's state: STOP_FAST_COMMIT and STOP_FAST_DIRTY where they are set
# (a copy without .git), else what git says; exported, so every run.py call records them
if [ -z "${STOP_FAST_COMMIT:-}" ] && provenance=$(git_provenance); then
  export $provenance
fi
case "${STOP_FAST_COMMIT:-}/${STOP_FAST_DIRTY:-}" in
  /*) echo "run_gpu.sh: no .git here: set STOP_FAST_COMMIT and STOP_FAST_DIRTY as 'bash benchmarks/run_gpu.sh --provenance' prints them where the copy was made" >&2
      [ $dry_run = 1 ] || exit 2 ;;
  */0|*/1) ;;
  */) echo "run_gpu.sh: STOP_FAST_COMMIT is set but STOP_FAST_DIRTY is not: set it to 1 (uncommitted changes) or 0, as 'bash benchmarks/run_gpu.sh --provenance' prints it where the copy was made" >&2
      [ $dry_run = 1 ] || exit 2 ;;
  *) echo "run_gpu.sh: STOP_FAST_DIRTY must be 1 (uncommitted changes) or 0, got '${STOP_FAST_DIRTY:-}' (commit ${STOP_FAST_COMMIT})" >&2
     [ $dry_run = 1 ] || exit 2 ;;
esac
export STOP_FAST_COMMIT STOP_FAST_DIRTY
commit="${STOP_FAST_COMMIT:-unknown} (dirty: ${STOP_FAST_DIRTY:-unknown})"
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
    targets)   limited "${run_py[@]}" --batch 32 --frames 12 "${budget[@]}" --only \
                 'model/*/fast_compiled/*,model/*/openclip_compiled/*,model/*/openclip_tuned_compiled/*,model/*/padded_sdpa_compiled/*' \
                 || rc=$? ;;
    kernels)   limited "${run_py[@]}" --only attention,scoring,packing "${budget[@]}" || rc=$? ;;
    model)     limited "${run_py[@]}" --only model "${budget[@]}" || rc=$? ;;
    model-b32) limited "${run_py[@]}" --only model/ViT-B-32 "${budget[@]}" || rc=$? ;;
    model-b16) limited "${run_py[@]}" --only model/ViT-B-16 "${budget[@]}" || rc=$? ;;
    scaling)   limited "${run_py[@]}" --only scaling "${budget[@]}" || rc=$? ;;
    only)
      if [ -z "${STOP_FAST_ONLY:-}" ]; then echo "step only: set STOP_FAST_ONLY to case ids or globs"; rc=2
      else limited "${run_py[@]}" --only "$STOP_FAST_ONLY" "${budget[@]}" || rc=$?; fi ;;
    nvdec)
      if [ $dry_run = 1 ]; then limited "$PY" -m stop_fast.data.nvdec
      else  # status 1 is an answer (no NVDEC here), not a failure of the step
        limited "$PY" -m stop_fast.data.nvdec >"$work/nvdec.json" || { r=$?; [ $r = 1 ] || rc=$r; }
        cat "$work/nvdec.json"
      fi ;;
    dali)
      if [ $dry_run = 0 ] && ! grep -q '"nvdec_available": true' "$work/nvdec.json" 2>/dev/null; then
        echo "dali: NVDEC is not usable here (nvdec.json); DALI would decode nothing a GPU run needs: skipped"
      elif [ -f "$repo/.gpu/base/gpu-install" ]; then
        (cd "$repo" && limited bash .gpu/base/gpu-install .gpu) || rc=$?
      else  # the base was installed in an earlier call, which kept the installer in /tmp
        (cd "$repo" && limited bash /tmp/gpu-install .gpu) || rc=$?
      fi ;;
    train)  # on prepared copies; PyAV workers, then DALI (NVDEC) where it imports and NVDEC decodes
      limited "$PY" "$repo/benchmarks/bench_train.py" --variants fast-compiled --decoder pyav --workers 16 \
        --steps 10 --warmup 3 --out "$work/train-pyav.json" || rc=$?
      if [ $dry_run = 1 ] || { "$PY" -c "import nvidia.dali" 2>/dev/null && grep -q '"nvdec_available": true' "$work/nvdec.json" 2>/dev/null; }; then
        limited "$PY" "$repo/benchmarks/bench_train.py" --variants fast-compiled --decoder dali --workers 16 \
          --steps 10 --warmup 3 --out "$work/train-dali.json" || rc=$?
      else
        echo "train: DALI does not import or NVDEC is not usable here: the PyAV run only"
      fi ;;
    decode)    limited "$PY" "$repo/benchmarks/bench_decode.py" --reps 10 --loader-clips 32 --out "$work/decode.json" || rc=$? ;;
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
