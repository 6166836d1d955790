#!/usr/bin/env bash
# The GPU check (issue #23): install the project the README's way, run the GPU-marked tests, and print the
# benchmark rows on CUDA. Each step has its own timeout (one hang cannot eat the budget; the timeouts add up
# to under 8 minutes) and the script ends with a summary of every step's status.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with one CUDA GPU, in a copy of the repo
#   GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh  # the same steps at tiny sizes on the CPU (plumbing)
#
# Environment: PYTHON (default python3), GPU_CHECK_VENV (default .gpu-check-venv), GPU_CHECK_OUT (logs and
# scratch files, default gpu-check-out), GPU_CHECK_TIMEOUT_SCALE (multiplies every timeout; default 1 on a GPU,
# 3 on the CPU). Installing: a venv (seeing the system's packages, so an installed
# CUDA torch is reused) and `pip install -e ".[dev]"`; when that fails (no network) the check falls back to
# the system python and its installed torch, running from the source tree, and says so.
# Exit status: 0 when every step passed, else 1.
set -u
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-gpu-check-out}
VENV=${GPU_CHECK_VENV:-.gpu-check-venv}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY=()
FAILED=0
STATUS=0

step() {  # step NAME TIMEOUT_S COMMAND...: run one step under its timeout, log it, record its status in STATUS
  local name=$1 limit=$(( $2 * TIMEOUT_SCALE )) started took
  shift 2
  echo
  echo "=== $name (timeout ${limit}s): $*"
  started=$(date +%s)
  timeout --kill-after 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  STATUS=${PIPESTATUS[0]}
  took=$(( $(date +%s) - started ))
  case $STATUS in
    0) SUMMARY+=("$(printf '%-10s ok       %4ss' "$name" "$took")") ;;
    124|137) SUMMARY+=("$(printf '%-10s TIMEOUT  %4ss (limit %ss)' "$name" "$took" "$limit")"); FAILED=1 ;;
    *) SUMMARY+=("$(printf '%-10s FAILED   %4ss (exit %s)' "$name" "$took" "$STATUS")"); FAILED=1 ;;
  esac
}

if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  MODE=gpu
  TIMEOUT_SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  MODE=cpu
  TIMEOUT_SCALE=${GPU_CHECK_TIMEOUT_SCALE:-3}
  echo "NO GPU: GPU_CHECK_ALLOW_CPU=1, so the same steps run at tiny sizes on the CPU (this proves the plumbing only)"
else
  echo "no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is false or torch is missing);"
  echo "set GPU_CHECK_ALLOW_CPU=1 to run the steps at tiny sizes on the CPU"
  exit 2
fi

# --- install: the README's way, else the system python's installed torch --------------------------------
step install 100 env PIP_DEFAULT_TIMEOUT=15 PIP_RETRIES=1 bash -c \
  "'$PYTHON' -m venv --system-site-packages '$VENV' && '$VENV/bin/python' -m pip install -e '.[dev]'"
if [ "$STATUS" = 0 ] && "$VENV/bin/python" -c "import cbm, pytest" 2>/dev/null; then
  PY="$VENV/bin/python"
  INSTALLED="venv $VENV with pip install -e \".[dev]\" (the README's way)"
else
  PY=$PYTHON
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  INSTALLED="FALLBACK: pip install -e \".[dev]\" failed (no network?), so the system $PYTHON and its installed"
  INSTALLED+=" torch run the source tree (PYTHONPATH)"
  SUMMARY[-1]="$(printf '%-10s FALLBACK (the system python; see the install log)' install)"
  FAILED=0  # a fallback is not a failed check; the later steps say whether it works
fi
echo
echo ">>> python: $INSTALLED"
"$PY" -c "import torch; print('>>> torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

# --- sizes: full on the GPU, tiny on the CPU ------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  TESTS=(-m gpu tests/test_gpu.py)
  EMBED=(--backbone torchvision:resnet50@random --n 2048 --batch-size 256 --repeats 2)
  PCBM=(--n 10000 --scale-sizes 1000000)
  ENERGY=(--n 2048 --per-sample 8 --train 4000 --val 400 --epochs 5)
  TEMPORAL=(--videos 1024 --device cuda)
else  # the CPU stands in: the same commands, tiny sizes, the test logic without its CUDA-only skip
  TESTS=(-m gpu tests/test_gpu.py)
  EMBED=(--backbone toy:cnn --n 64 --batch-size 32 --repeats 1 --threads 1)
  PCBM=(--n 2000 --scale-sizes 20000)
  ENERGY=(--n 32 --per-sample 2 --train 300 --val 64 --epochs 1 --concepts 16 --classes 10 --threads 1)
  TEMPORAL=(--videos 64)
fi

step tests 100 "$PY" -m pytest -o addopts=-ra -p no:cacheprovider -q "${TESTS[@]}"
step embed 60 "$PY" benchmarks/bench_embed.py "${EMBED[@]}" --image-format jpeg --memory-sizes
step pcbm 120 "$PY" benchmarks/bench_pcbm.py "${PCBM[@]}" --scale-stream off on
step energy 40 "$PY" benchmarks/bench_energy.py "${ENERGY[@]}"
step temporal 25 "$PY" benchmarks/bench_temporal.py "${TEMPORAL[@]}"
step torchrun 30 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tests/test_gpu.py "$OUT/torchrun"

echo
echo "=== summary ($MODE; $INSTALLED)"
printf '  %s\n' "${SUMMARY[@]}"
grep -h "cbm.embed throughput\|PCBM fit, .*time\|ECBM predict\|ECBM training\|MoTIF training\|rank 0 of" \
  "$OUT"/embed.log "$OUT"/pcbm.log "$OUT"/energy.log "$OUT"/temporal.log "$OUT"/torchrun.log 2>/dev/null |
  sed 's/^ */  /'
exit $FAILED
