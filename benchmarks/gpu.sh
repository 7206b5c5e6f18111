#!/usr/bin/env bash
# Throughput of the distillation step on one H100/H200 GPU, from the source tree, in under
# 8 minutes; installs nothing (needs python3 with jax[cuda], flax, optax and numpy):
#
#     bash benchmarks/gpu.sh            # the gpu preset: 8B-shaped teacher, 1B student, bf16
#     bash benchmarks/gpu.sh --tiny     # tiny sizes, any machine (the test suite runs this)
#
# Any other argument is passed to benchmarks/throughput.py, e.g. `--teacher-layers 16` to
# shrink the teacher, `--kinds fused,split`, `--json PATH`. It prints the device and one
# table, and writes benchmarks/results/throughput_gpu.json (--tiny: throughput_gpu_quick.json).
# Then the engine's overhead on the device: kd_jax's step against the minimal JAX step of the
# same maths (benchmarks/vs_pytorch.py --no-torch, the cpu workload in float32, under a
# minute), written to benchmarks/results/vs_minimal_gpu.json (beside --json's file if given).
# A step kind that runs out of memory (or crashes, or outlives the time budget) is a row of
# the table saying so; the others still run, and the exit code is then 3.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# Each step kind runs alone in its own process (--isolate), so it may take nearly all of the
# device's memory; XLA allocates this fraction up front (its default is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

args=(--preset gpu --dtype bfloat16 --isolate --steps 5 --repeats 3)
# The four kinds share this wall time (seconds): start-up, compiling and timing.
budget=420
passthrough=()
minimal_args=(--no-torch --steps 5 --repeats 3)
minimal_json="benchmarks/results/vs_minimal_gpu.json"
previous=""
for arg in "$@"; do
    if [[ "$arg" == "--tiny" ]]; then
        args+=(--quick)
        minimal_args=(--no-torch --quick --steps 1 --repeats 1)
        minimal_json="benchmarks/results/vs_minimal_gpu_quick.json"
    else
        passthrough+=("$arg")
    fi
    if [[ "$previous" == "--json" ]]; then
        minimal_json="${arg%.json}_vs_minimal.json"
    fi
    previous="$arg"
done

echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || echo "nvidia-smi failed"
else
    echo "nvidia-smi not found: JAX's default device will be used"
fi
echo "== throughput (bfloat16; each step kind in a process of its own, then the peak)"
status=0
"$PYTHON" benchmarks/throughput.py "${args[@]}" --budget-s "$budget" \
    ${passthrough[@]+"${passthrough[@]}"} || status=$?
if [[ $status -eq 3 ]]; then
    echo "gpu.sh: some step kinds did not run (see the table); the others' figures stand" >&2
elif [[ $status -ne 0 ]]; then
    echo "gpu.sh: benchmarks/throughput.py failed with exit code $status" >&2
fi
echo "== engine overhead: kd_jax against the minimal JAX step (float32)"
minimal_status=0
"$PYTHON" benchmarks/vs_pytorch.py "${minimal_args[@]}" --json "$minimal_json" \
    || minimal_status=$?
if [[ $minimal_status -ne 0 ]]; then
    echo "gpu.sh: benchmarks/vs_pytorch.py --no-torch failed with exit code $minimal_status" >&2
    [[ $status -eq 0 ]] && status=$minimal_status
fi
exit "$status"
