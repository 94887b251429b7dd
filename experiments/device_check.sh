#!/usr/bin/env bash
# Runs lm_jax's checks on whatever accelerator JAX finds (GPU, TPU; the CPU otherwise) and
# writes JSON: the test suite, bench_kernels.py, bench_heads.py and bench_train_step.py (float32
# against --dtype=bfloat16 mixed precision), each under a time limit.
#
#   bash experiments/device_check.sh                 # everything, results in $OUT or results/device_check
#   STAGES="kernels heads" bash experiments/device_check.sh
#   SUITE_ARGS="tests/heads" SUITE_LIMIT=300 bash experiments/device_check.sh
#
# Environment (all optional):
#   OUT            output folder (default results/device_check)
#   STAGES         which of "suite kernels heads train_step" to run, in that order (default all)
#   SUITE_ARGS     pytest arguments (default: the CI suite, -m "not slow")
#   SUITE_LIMIT, KERNELS_LIMIT, HEADS_LIMIT, STEP_LIMIT   seconds each stage may run (240, 150, 180, 90)
#   KERNEL_SIZE    bench_kernels.py --size (default full: the sizes of record)
#   HEAD_VOCABS    bench_heads.py --vocab_sizes (default 10000,100000)
# Writes device.json (devices, jax and jaxlib versions, nvidia-smi), suite.xml (JUnit),
# bench_kernels.json, bench_heads.json and .png, bench_train_step.json, one log per stage, and summary.json (each
# stage's exit code and seconds; 124 means it ran out of its limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/device_check}"
STAGES="${STAGES:-suite kernels heads train_step}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 - "$OUT/device.json" <<'EOF'
import json, shutil, subprocess, sys
import jax, jaxlib
info = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__}
if shutil.which("nvidia-smi"):
  info["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
      capture_output=True, text=True).stdout.strip()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

declare -A RC SECONDS_TAKEN
run_stage() {  # name limit command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  tail -n 5 "$OUT/$name.log"
}

for stage in $STAGES; do
  case $stage in
    suite)
      if [ -n "${SUITE_ARGS:-}" ]; then read -ra suite_args <<< "$SUITE_ARGS"
      else suite_args=(-m "not slow"); fi
      run_stage suite "${SUITE_LIMIT:-240}" python3 -m pytest -q -n 2 -p no:cacheprovider \
        --junitxml="$OUT/suite.xml" "${suite_args[@]}" ;;
    kernels)
      run_stage kernels "${KERNELS_LIMIT:-150}" python3 experiments/bench_kernels.py \
        --size="${KERNEL_SIZE:-full}" --json_out="$OUT/bench_kernels.json" ;;
    heads)
      run_stage heads "${HEADS_LIMIT:-180}" python3 experiments/bench_heads.py \
        --vocab_sizes="${HEAD_VOCABS:-10000,100000}" --repeats=3 \
        --json_out="$OUT/bench_heads.json" --plot_out="$OUT/bench_heads.png" ;;
    train_step)
      run_stage train_step "${STEP_LIMIT:-90}" python3 experiments/bench_train_step.py \
        --hidden=650 --batch_size=64 --bptt=35 --repeats=10 \
        --json_out="$OUT/bench_train_step.json" ;;
    *) echo "unknown stage $stage (expected suite, kernels, heads, train_step)"; exit 2 ;;
  esac
done

python3 - "$OUT/summary.json" <<EOF
import json, sys
stages = {$(for s in $STAGES; do printf '"%s": {"exit_code": %s, "seconds": %s}, ' "$s" "${RC[$s]}" "${SECONDS_TAKEN[$s]}"; done)}
json.dump({"device": json.load(open("$OUT/device.json")), "stages": stages}, open(sys.argv[1], "w"),
          indent=1)
print(json.dumps(stages))
EOF
