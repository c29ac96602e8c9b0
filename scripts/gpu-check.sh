#!/usr/bin/env bash
# GPU check of profilemate's CUDA timing backend (profilemate-cuda) and of the vLLM binding's GPU
# paths, in one call of under 6 minutes on a machine with an NVIDIA GPU. It builds nothing: the GPU
# machine cannot reach crates.io, so the example is built on a development machine (no CUDA toolkit or driver needed
# there: cudarc loads the driver at run time) and its binary travels with the working tree.
#
# 1. Build, on the development machine, from the repository root:
#
#      CUDARC_CUDA_VERSION=12000 cargo build --release -p profilemate-cuda --example gpu_step_loop
#
#    CUDARC_CUDA_VERSION=12000 builds against cudarc's CUDA 12.0 driver bindings, whose entry
#    points every driver from CUDA 12.0 on exports. Without it, a machine with no nvcc gets
#    cudarc's newest bindings (CUDA 13), which need a driver of CUDA 12.8 or later.
#
#    and the vLLM binding's abi3 wheel (any Python >= 3.10; maturin is in the vLLM test environment):
#
#      (cd profilemate-vllm && maturin build --release -o ../target/wheels)
#
# 2. Carry the binary and the wheel (ignored paths) and run this script there, e.g. with the
#    device tool:
#
#      carry:   ["target/release/examples/gpu_step_loop", "target/wheels"]
#      command: bash scripts/gpu-check.sh
#      timeout: 420 s
#
# The binding's part (profilemate-vllm/tests/gpu_check.py) needs PyTorch with CUDA on that
# machine, not vLLM: it unpacks the wheel and drives the binding's GPU paths on real CUDA tensors
# (forward timing with CUDA events under torch.cuda.set_sync_debug_mode("error"), a replayed CUDA
# graph, the MoE counts on the device with their pinned copy), each against torch.cuda.Event
# references. Without PyTorch or a wheel it says so and that part counts as not run (exit 2).
#
# It prints, for a heavy step (8 x 64 MiB device-to-device copies, about 0.4 ms on an H100) and a
# light one (1 x 1 MiB, launch-bound): CUDA-event time against host time with a stream
# synchronisation (agreement), the host cost per timed step of the backend, the synchronisations
# on the engine thread (must be 0), and the step rate with profiling on against off. Exit status:
# 0 when every check passed, 1 when one failed, 2 when something this script needs is missing.
# Where $OUT is set (the device tool sets it), the output is also saved to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

bin=target/release/examples/gpu_step_loop
log=/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then log="$OUT/gpu-check.log"; fi

say() { echo "$*" | tee -a "$log"; }
need() {
  say "gpu-check: $*"
  say "gpu-check: needs an x86-64 machine with an NVIDIA GPU, its driver (nvidia-smi, libcuda.so.1), and"
  say "           $bin built beforehand with:"
  say "           CUDARC_CUDA_VERSION=12000 cargo build --release -p profilemate-cuda --example gpu_step_loop"
  exit 2
}

[ "$(uname -m)" = x86_64 ] || need "this is $(uname -m), and the carried binary is x86-64"
[ -x "$bin" ] || need "$bin is missing (build it on the development machine and carry it)"
command -v nvidia-smi >/dev/null 2>&1 || need "nvidia-smi not found: no NVIDIA driver here"
if ! nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1; then
  need "nvidia-smi cannot talk to a GPU"
fi
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
libcuda=$( (ldconfig -p 2>/dev/null | grep -o '/.*libcuda\.so\.1$' | head -1) || true)
if [ -z "$libcuda" ]; then
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/local/cuda/compat ${LD_LIBRARY_PATH//:/ }; do
    if [ -e "$d/libcuda.so.1" ]; then libcuda="$d/libcuda.so.1"; break; fi
  done
fi
[ -n "$libcuda" ] || need "libcuda.so.1 not found by the loader (ldconfig -p) nor in the usual directories"
say "driver library: $libcuda"

status=0
run() {
  local limit=$1; shift
  say ""
  say "=== gpu_step_loop $* (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" "$bin" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    124|137) say "gpu-check: gpu_step_loop $* ran past ${limit}s"; status=1 ;;
    2) say "gpu-check: gpu_step_loop could not run here (see above)"; exit 2 ;;
    *) say "gpu-check: gpu_step_loop $* failed (exit $rc)"; status=1 ;;
  esac
}

# Heavy step: GPU-bound, where agreement is meaningful and the step rate shows the cost of
# profiling on a realistic forward pass.
run 150 --mib 64 --copies 8 --steps 10000 --block 250 --agreement-steps 300
# Light step: launch-bound, where the host cost of the two event records is the largest share.
run 90 --mib 1 --copies 1 --steps 40000 --block 1000 --agreement-steps 200

# The vLLM binding's GPU paths, without vLLM (PyTorch only), from the carried wheel.
say ""
say "=== profilemate-vllm binding: profilemate-vllm/tests/gpu_check.py (limit 100s) ==="
py=${PYTHON:-python3}
wheel=$(ls target/wheels/profilemate_vllm-*-abi3-*.whl 2>/dev/null | tail -1)
if [ -z "$wheel" ]; then
  say "gpu-check: no binding wheel under target/wheels (build it with maturin and carry it): binding part not run"
  [ $status -eq 0 ] && status=2
else
  timeout --kill-after=10 100 "$py" profilemate-vllm/tests/gpu_check.py --wheel "$wheel" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    2) say "gpu-check: the binding part could not run here (see above)"; [ $status -eq 0 ] && status=2 ;;
    124|137) say "gpu-check: the binding part ran past 100s"; status=1 ;;
    *) say "gpu-check: the binding part failed (exit $rc)"; status=1 ;;
  esac
fi

say ""
if [ $status -eq 0 ]; then say "gpu-check: OK"; elif [ $status -eq 2 ]; then say "gpu-check: INCOMPLETE"; else say "gpu-check: FAILED"; fi
exit $status
