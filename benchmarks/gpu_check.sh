#!/usr/bin/env bash
# One prepared check of the library on a CUDA machine, written up as one Markdown report.
#
#     bash benchmarks/gpu_check.sh [OUT]               # from the repository root; OUT defaults
#                                                      # to gpu-check-results/ (git-ignored)
#     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/out   # dry run: CPU, tiny sizes
#
# Steps, each under its own timeout, all clipped to one deadline (GPU_CHECK_DEADLINE, 450 s;
# on the CPU every limit is 4 times longer: there it checks the commands, not the budget):
#   env             date, nvidia-smi, python / torch / triton versions, git commit       20 s
#   install         make `import secondorder.kernels` work offline: already importable,
#                   else `pip install -e .`, else `pip install --target` (no index)     30 s
#   pytest          pytest -m gpu: every Triton kernel against its reference on CUDA    140 s
#   factor          benchmarks/bench_factor_kernel.py                                     20 s
#   conv_factor     benchmarks/bench_conv_factor.py (ResNet-18 layer1 and layer4)         45 s
#   mfac_fp32/bf16  benchmarks/bench_mfac.py at m = 1024: IHVP vs the streaming read   2 x 50 s
#   step_breakdown  benchmarks/step_breakdown.py, CIFAR ResNet-18 (synthetic data)        95 s
#   seeds           benchmarks/bench_seeds.py, only where the seed folders are present:
#                   120 s, or what is left of the deadline
# The other timeouts add up to the 450 s deadline; on an H100 the run should take 3-5 minutes
# (estimated: not yet run on one). The CPU dry run needs about 45 s of CPU time (1-2 minutes
# of wall time on a busy 2-core machine). A failing or hung step does not stop the others:
# the report names it with the tail of its log, and the script exits 1 after writing it.
#
# OUT receives at most six flat files: gpu_check.md (the report), gpu_check.log (every
# step's full output), pytest_gpu.log, pytest_gpu.xml (junit), step_breakdown.csv, seeds.csv.
#
# Environment: GPU_CHECK_DEVICE (cuda | cpu), GPU_CHECK_PYTHON (default python3),
# GPU_CHECK_SEEDS (the folder holding AdaFisher/, KFAC-Pytorch/, M-FAC/; default: seeds/ or
# shared/seeds/ when one of them holds such a folder), GPU_CHECK_COMMIT (printed when there
# is no .git), GPU_CHECK_DEADLINE (seconds), and for testing this script GPU_CHECK_ONLY and
# GPU_CHECK_FAIL (comma-separated step names to run only / to fail on purpose).
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/gpu-check-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && cd "$REPO" || exit 2
rm -f "$OUT"/{gpu_check.md,gpu_check.log,pytest_gpu.log,pytest_gpu.xml,step_breakdown.csv,seeds.csv}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${GPU_CHECK_PYTHON:-python3}
SCALE=1
[[ $DEVICE == cuda ]] || SCALE=4  # process start-up alone takes seconds on a busy 2-core CPU
DEADLINE=${GPU_CHECK_DEADLINE:-$((450 * SCALE))}
WORK=$(mktemp -d)  # per-step logs and the steps table, summarised into OUT at the end
trap 'rm -rf "$WORK"' EXIT
# the benchmarks must time the Triton kernels, not the torch references; unbuffered output
# keeps the last lines before a hang in the log
unset SECONDORDER_REFERENCE_KERNELS TRITON_INTERPRET
export PYTHONUNBUFFERED=1
START=$(date +%s.%N)  # SECONDS (whole seconds since the start) keeps the deadline
FAILED=0

wanted() { [[ -z ${GPU_CHECK_ONLY:-} || ",$GPU_CHECK_ONLY," == *",$1,"* ]]; }

# record NAME STATUS RC T0 LIMIT COMMAND: one row of the steps table
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(date +%s.%N)" "$5" "$6" \
    >>"$WORK/steps.tsv"
  [[ $2 == ok || $2 == skipped ]] || FAILED=$((FAILED + 1))
  echo "gpu_check: $1 $2" >&2
}

# run_step NAME TIMEOUT COMMAND...: COMMAND (a program, or a function of this script run in
# this shell, whose commands take their limit from STEP_LIMIT) with output to WORK/NAME.log,
# its timeout clipped to what is left of the deadline.
run_step() {
  local name=$1 limit=$(($2 * SCALE)) t0 rc status
  shift 2
  wanted "$name" || return 0
  t0=$(date +%s.%N)
  ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
  echo "\$ $*" >"$WORK/$name.log"
  if ((limit < 1)); then
    echo "not started: the ${DEADLINE} s deadline has passed" >>"$WORK/$name.log"
    rc=124
  elif [[ ",${GPU_CHECK_FAIL:-}," == *",$name,"* ]]; then
    echo "injected failure (GPU_CHECK_FAIL=$GPU_CHECK_FAIL)" >>"$WORK/$name.log"
    rc=3
  elif declare -F "$1" >/dev/null; then
    STEP_LIMIT=$limit "$@" >>"$WORK/$name.log" 2>&1
    rc=$?
  else
    timeout -k 5 "$limit" "$@" >>"$WORK/$name.log" 2>&1
    rc=$?
  fi
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$t0" "$limit" "$*"
}

# Make `import secondorder.kernels` work from the repository root (where pytest puts it on
# sys.path) without a network. pyproject maps kernels/ to secondorder.kernels, so PYTHONPATH=.
# is not enough: an editable install resolves the mapping; failing that (a read-only or
# externally managed python), a copy under WORK/site, put before the repository on sys.path
# (PYTHONSAFEPATH keeps the current directory off it, and pytest appends its rootdir).
importable() {
  "$PY" -c 'import secondorder, secondorder.kernels as k
print("secondorder from", secondorder.__file__, "; kernels from", k.__file__)'
}
install_package() {
  if importable; then
    echo "install: none needed (already importable)"
    return 0
  fi
  local pip=("$PY" -m pip install --no-deps --no-build-isolation --no-index)
  if PIP_BREAK_SYSTEM_PACKAGES=1 timeout "$STEP_LIMIT" "${pip[@]}" -e . && importable; then
    echo "install: editable (pip install -e .)"
    return 0
  fi
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  export PYTEST_ADDOPTS="--import-mode=append ${PYTEST_ADDOPTS:-}"
  if timeout "$STEP_LIMIT" "${pip[@]}" --target "$WORK/site" . && importable; then
    echo "install: copy (pip install --target, PYTHONPATH)"
    return 0
  fi
  return 1
}

# shellcheck disable=SC2054  # the commas separate values inside one option
if [[ $DEVICE == cuda ]]; then
  FACTOR=(--sizes 4096x64,4096x256,8192x512,2048x1024 --repeats 20)
  CONV=(--batch 128 --repeats 5 --layers layer1,layer4 --timeout 40)
  MFAC=(--m 1024 --d 100000,200000 --repeats 20 --budget 2)
  BREAKDOWN=(--task resnet18 --batch 128 --steps 20 --warmup 3 --curvature-every 10
    --inverse-every 100 --set mfac.curvature_every=1 --set ekfac.scale_every=10)
  SEEDS_ARGS=(--task resnet18 --batch 128 --steps 20 --warmup 3)
else  # the same commands at sizes a 2-core CPU runs in seconds
  FACTOR=(--sizes 512x32,256x64 --repeats 3)
  CONV=(--batch 2 --repeats 1 --layers layer4 --threads 1 --timeout 120)
  MFAC=(--m 16 --d 2000 --repeats 3 --budget 0.2)
  BREAKDOWN=(--task digits-cnn --batch 8 --steps 2 --warmup 1 --threads 1)
  SEEDS_ARGS=(--task mlp --batch 8 --steps 2 --warmup 1 --threads 1)
fi
METHODS=sgd,adam,kfac,ekfac,mfac,adafisher

run_step env 20 "$PY" benchmarks/gpu_check_report.py env --device "$DEVICE"
run_step install 30 install_package
# a module that fails to import is an error in the counts, not the end of the gpu tests
run_step pytest 140 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$OUT/pytest_gpu.xml"
run_step factor 20 "$PY" benchmarks/bench_factor_kernel.py --device "$DEVICE" "${FACTOR[@]}"
run_step conv_factor 45 "$PY" benchmarks/bench_conv_factor.py --device "$DEVICE" "${CONV[@]}"
run_step mfac_fp32 50 "$PY" benchmarks/bench_mfac.py --device "$DEVICE" "${MFAC[@]}" \
  --dtype float32
run_step mfac_bf16 50 "$PY" benchmarks/bench_mfac.py --device "$DEVICE" "${MFAC[@]}" \
  --dtype bfloat16
run_step step_breakdown 95 "$PY" benchmarks/step_breakdown.py --device "$DEVICE" \
  "${BREAKDOWN[@]}" --opt "$METHODS" --csv "$OUT/step_breakdown.csv"

has_seeds() { [[ -d $1/AdaFisher || -d $1/KFAC-Pytorch || -d $1/M-FAC ]]; }
SEEDS=${GPU_CHECK_SEEDS:-}
if [[ -z $SEEDS ]]; then
  for dir in seeds shared/seeds; do
    has_seeds "$dir" && SEEDS=$dir && break
  done
fi
if [[ -n $SEEDS ]] && has_seeds "$SEEDS"; then
  run_step seeds 120 "$PY" benchmarks/bench_seeds.py --device "$DEVICE" --seeds "$SEEDS" \
    "${SEEDS_ARGS[@]}" --opt "$METHODS" --csv "$OUT/seeds.csv"
elif wanted seeds; then
  printf '%s\n' "\$ bench_seeds.py" "skipped: no AdaFisher/, KFAC-Pytorch/ or M-FAC/ under" \
    "${SEEDS:-seeds/ or shared/seeds/} (set GPU_CHECK_SEEDS to the folder holding them)" \
    >"$WORK/seeds.log"
  record seeds skipped - "$(date +%s.%N)" 0 "benchmarks/bench_seeds.py"
fi

[[ -f $WORK/pytest.log ]] && cp "$WORK/pytest.log" "$OUT/pytest_gpu.log"
touch "$WORK/steps.tsv"
while IFS=$'\t' read -r name _; do
  echo "===== $name"
  cat "$WORK/$name.log"
done <"$WORK/steps.tsv" >"$OUT/gpu_check.log"
if ! "$PY" benchmarks/gpu_check_report.py report --work "$WORK" --out "$OUT" \
  --device "$DEVICE" --start "$START" --deadline "$DEADLINE"; then
  # no python to write the report with: the steps table and the logs' tails, as they are
  { echo "# GPU check (the report writer failed: raw steps table and log tails)"
    echo '```'
    cat "$WORK/steps.tsv"
    while IFS=$'\t' read -r name _; do
      echo "===== $name"
      tail -n 20 "$WORK/$name.log"
    done <"$WORK/steps.tsv"
    echo '```'; } >"$OUT/gpu_check.md"
  FAILED=$((FAILED + 1))
fi
echo "gpu_check: report in $OUT/gpu_check.md; $FAILED failure(s)" >&2
((FAILED == 0))
