#!/usr/bin/env bash
# Installs NVIDIA's CUDA compiler (nvcc + ptxas + cicc + headers) from PyPI into `.tools/nvcc`,
# without a GPU or a driver: enough to compile `kernels/*.cu` to PTX / cubin.
#
# Pinned to CUDA 13.0: the lent GPUs run driver 580 (CUDA 13.0), and a driver refuses PTX whose
# ISA version comes from a newer nvcc than it knows.
#
# Idempotent: when `.tools/nvcc/nvidia/cu13/bin/nvcc` already runs, nothing is downloaded.
# Prints the nvcc path and version last. `build/ptx.rs` finds nvcc at this path by itself.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$ROOT/.tools/nvcc"
CUDA_DIR="$TARGET/nvidia/cu13"
NVCC="$CUDA_DIR/bin/nvcc"
PYTHON="${PYTHON:-python3}"

if ! "$NVCC" --version >/dev/null 2>&1; then
    echo "installing nvcc 13.0 from PyPI into $TARGET" >&2
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --upgrade --target "$TARGET" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*"
    # cargo does not watch a file that did not exist at the last build: touch the build script
    # so the next `cargo build` finds this nvcc and compiles the kernels.
    touch "$ROOT/build/ptx.rs"
fi

# cuobjdump + nvdisasm (SASS disassembly, for the instruction counts of scripts/check_kernels.sh) in a folder of
# its own: a second `pip install --target` into .tools/nvcc would replace its nvidia/ tree. PyPI has
# no 13.0 build of it; 13.2 reads the sm_90 cubins that ptxas 13.0 writes.
SASS_DIR="$ROOT/.tools/sass"
if ! "$SASS_DIR/nvidia/cu13/bin/nvdisasm" --version >/dev/null 2>&1; then
    echo "installing cuobjdump 13.2 from PyPI into $SASS_DIR" >&2
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --upgrade --target "$SASS_DIR" "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*"
fi

# The wheels unpack into one toolkit-shaped tree (nvidia/cu13/{bin,nvvm/bin,include,lib}), and
# bin/nvcc.profile already points nvcc at nvvm/bin/cicc, bin/ptxas and include/{,cccl}: no
# symlinks are needed. Check that the pieces nvcc calls are really there.
for tool in "$CUDA_DIR/bin/nvcc" "$CUDA_DIR/bin/ptxas" "$CUDA_DIR/nvvm/bin/cicc" \
    "$CUDA_DIR/include/cuda_bf16.h" "$CUDA_DIR/include/cccl"; do
    if [ ! -e "$tool" ]; then
        echo "install_nvcc.sh: $tool is missing after the install; remove $TARGET and retry" >&2
        exit 1
    fi
done

# Smoke test: compile a bf16 kernel to PTX (needs only a host C++ compiler for preprocessing).
SMOKE_DIR="$(mktemp -d)"
trap 'rm -rf "$SMOKE_DIR"' EXIT
cat >"$SMOKE_DIR/smoke.cu" <<'CU'
#include <cuda_bf16.h>
extern "C" __global__ void smoke(const __nv_bfloat16* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = expf(__bfloat162float(x[i]));
}
CU
if ! "$NVCC" -ptx -O3 -arch=compute_80 "$SMOKE_DIR/smoke.cu" -o "$SMOKE_DIR/smoke.ptx"; then
    echo "install_nvcc.sh: nvcc is installed but cannot compile a kernel (is a host C++ compiler, g++, installed?)" >&2
    exit 1
fi

echo "cuobjdump: $SASS_DIR/nvidia/cu13/bin/cuobjdump"
echo "nvcc: $NVCC"
"$NVCC" --version | tail -n 2
