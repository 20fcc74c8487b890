#!/usr/bin/env bash
# Run the tests as other machines would: PyTorch's CPU kernel selection, MKL's code path
# and the thread count change the order in which sums are taken, so a tolerance that only
# holds on one CPU fails here first. Each configuration runs in its own pytest process:
#
#   ATEN_CPU_CAPABILITY=default   PyTorch's portable kernels (no AVX2/AVX-512 vectorisation)
#   ATEN_CPU_CAPABILITY=avx2      the AVX2 kernels (what an AVX-512 machine would not pick)
#   MKL_CBWR=COMPATIBLE           MKL's conditional-bitwise-reproducibility path for any CPU
#   OMP_NUM_THREADS=1             one thread (every reduction in one order)
#   OMP_NUM_THREADS=2             two threads (split reductions)
#
# Usage (from anywhere; the tests run from the repository root):
#   tests/portability.sh                 the whole suite under every configuration
#   tests/portability.sh --quick         the numerical tests only (what CI runs)
#   tests/portability.sh [--quick] -- -x -k eigh   further arguments go to pytest
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3);
# PORTABILITY_CONFIGS picks a subset of the configurations.
# Exits non-zero if any configuration failed; prints one line per configuration with
# its time. On the 2-core CI machine --quick takes about 6 minutes, the whole suite
# about 5 minutes per configuration.
set -u
cd "$(dirname "$0")/.."

# The tests that compare numbers computed along different code paths (estimators against
# dense references, kernels against their references, batched against per-layer solvers,
# distributed against local): these are the ones a different CPU can break.
QUICK_PATHS=(
    tests/estimators/test_batched_refresh.py
    tests/estimators/test_kfac.py
    tests/estimators/test_mfac.py
    tests/estimators/test_shampoo.py
    tests/estimators/test_soap.py
    tests/test_grafting.py
    tests/kernels
    tests/layers
    tests/distributed/test_communicator.py
    tests/robustness/test_conditioning.py
    tests/prune/test_inverse.py
    tests/test_linalg.py
    tests/test_fisher.py
)
CONFIGS=(
    "ATEN_CPU_CAPABILITY=default"
    "ATEN_CPU_CAPABILITY=avx2"
    "MKL_CBWR=COMPATIBLE"
    "OMP_NUM_THREADS=1"
    "OMP_NUM_THREADS=2"
)

# PORTABILITY_CONFIGS (space-separated) runs only those configurations, e.g. CI's
# "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1".
if [ -n "${PORTABILITY_CONFIGS:-}" ]; then
    read -r -a CONFIGS <<<"$PORTABILITY_CONFIGS"
fi

paths=(tests)
if [ "${1:-}" = "--quick" ]; then
    paths=("${QUICK_PATHS[@]}")
    shift
fi
if [ "${1:-}" = "--" ]; then
    shift
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

failed=()
summary=()
for config in "${CONFIGS[@]}"; do
    echo "=== $config: pytest ${paths[*]} $*"
    start=$(date +%s)
    # -p no:cacheprovider: the runs must not reorder each other through --lf caches
    # a fresh inductor cache per configuration: code compiled for one CPU capability
    # (AVX2 vector types) does not build under another (ATEN_CPU_CAPABILITY=default)
    cache=$(mktemp -d)
    env "$config" TORCHINDUCTOR_CACHE_DIR="$cache" \
        "$PYTHON" -m pytest -q -p no:cacheprovider "${paths[@]}" "$@"
    rc=$?
    rm -rf "$cache"
    took=$(($(date +%s) - start))
    summary+=("$config: exit $rc in ${took} s")
    if [ "$rc" -ne 0 ]; then failed+=("$config"); fi
done

echo "=== portability summary (load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "FAILED under: ${failed[*]}"
    exit 1
fi
echo "every configuration passed"
