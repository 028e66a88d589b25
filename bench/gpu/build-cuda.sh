#!/usr/bin/env bash
# Builds the CUDA flavour of flywheel (server, trainer, bench) for Hopper
# (sm_90) on a machine with no CUDA install and no GPU, then packs the
# stripped binaries for a GPU machine.
#
# The CUDA 13.0 compiler, headers and libraries come from NVIDIA's PyPI
# wheels, installed with pip into a local folder (default
# ~/.cache/flywheel/cuda-13.0). 13.0 matches the oldest driver we target
# (R580): PTX from a newer nvcc would not load on it. The link step needs
# unversioned library names and a `libcuda.so` (the driver, absent here): the
# script adds the symlinks and compiles a stub libcuda whose every entry point
# returns CUDA_ERROR_STUB_LIBRARY. At run time the real driver's libcuda.so.1
# is used (bench/gpu/run.sh sets the library path).
#
# Usage: bench/gpu/build-cuda.sh [OUT_DIR, default var/gpu]
# Env:   FLYWHEEL_CUDA_DIR  toolkit folder   CARGO_TARGET_DIR  (default ~/.cache/flywheel/target-cuda)
#        CUDA_COMPUTE_CAP   (default 90)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/var/gpu}"
cuda_dir="${FLYWHEEL_CUDA_DIR:-$HOME/.cache/flywheel/cuda-13.0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flywheel/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# 1. Toolkit from PyPI (pinned: nvcc, runtime and nvrtc of the same release).
tk="$cuda_dir/nvidia/cu13"
if [ ! -x "$tk/bin/nvcc" ] || [ ! -e "$tk/lib/libcublas.so.13" ]; then
  python3 -m pip install --quiet --no-deps --target "$cuda_dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi

# 2. Link-time names: libX.so -> libX.so.N, and a stub libcuda.so (soname
#    libcuda.so.1, so binaries load the driver's library at run time).
for lib in cublas cublasLt cudart curand nvrtc; do
  real="$(cd "$tk/lib" && ls "lib$lib.so."* | grep -v builtins | head -1)"
  ln -sfn "$real" "$tk/lib/lib$lib.so"
done
mkdir -p "$tk/lib/stubs"
if [ ! -e "$tk/lib/stubs/libcuda.so" ]; then
  registry="$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1 || true)"
  if [ -z "$registry" ]; then (cd "$root" && cargo fetch --locked -q); registry="$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* | tail -1)"; fi
  grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$registry/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$tk/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$tk/lib/stubs/libcuda.c"
fi

export CUDA_HOME="$tk" CUDA_ROOT="$tk" PATH="$tk/bin:$PATH"
export LIBRARY_PATH="$tk/lib:$tk/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

# 3. Build (the same single profile as the CPU build).
cd "$root"
cargo build --locked --bins -p flywheel-server -p flywheel-trainer -p flywheel-bench \
  --features flywheel-server/cuda,flywheel-trainer/cuda,flywheel-bench/cuda

# 4. Pack for bench/gpu/run.sh: stripped, xz-compressed binaries; a model of
#    the served model's shape that compresses to a few MB (shape-model.py);
#    the HWU64 training file.
mkdir -p "$out"
for bin in flywheel-server flywheel-trainer flywheel-bench; do
  strip -o "$out/$bin" "$CARGO_TARGET_DIR/debug/$bin"
  xz -T0 -9 -f "$out/$bin"
done
model="${FLYWHEEL_GPU_MODEL:-models/smollm2-135m-instruct-q8_0.gguf}"
[ -e "$model" ] || { echo "no $model: fetch it with the CPU build first (flywheel-trainer fetch-model)" >&2; exit 1; }
python3 bench/gpu/shape-model.py "$model" "$out/model.gguf"
xz -T0 -9 -f "$out/model.gguf"
cp "${FLYWHEEL_GPU_DATA:-../shared/data/hwu64/hwu64_kfold1_train.csv}" "$out/hwu64_train.csv"
ls -l "$out"
