#!/usr/bin/env bash
# Compiles every kernels/*.cu to cubin for sm_80 (A100) and sm_90 (H100/H200) with `ptxas -v` and
# prints, per kernel and architecture, registers / spill stores / spill loads / stack frame /
# static shared memory. Exits non-zero on any register spill or non-zero stack frame (a spill or a
# local-memory array in a bandwidth-bound kernel is a silent slowdown), or on a compile error.
# Then, for sm_90, the instructions per element of each kernel's hot loop read from its SASS
# (scripts/sass_loop_counts.py, cuobjdump from scripts/install_nvcc.sh), failing past the bounds of
# kernels/sass_bounds.txt.
#
# No GPU needed. nvcc is found like build/ptx.rs finds it (HALO_NVCC, $CUDA_HOME/bin, PATH, then
# the project-local .tools/nvcc); when there is none, scripts/install_nvcc.sh installs it.
#
# Usage: scripts/check_kernels.sh [ARCH ...]      (default: sm_80 sm_90)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_nvcc() {
    if [ -n "${HALO_NVCC:-}" ] && [ -x "$HALO_NVCC" ]; then echo "$HALO_NVCC"; return; fi
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
    if [ -x "$ROOT/.tools/nvcc/nvidia/cu13/bin/nvcc" ]; then echo "$ROOT/.tools/nvcc/nvidia/cu13/bin/nvcc"; return; fi
}

NVCC="$(find_nvcc)"
if [ -z "$NVCC" ]; then
    echo "check_kernels.sh: no nvcc found; installing it with scripts/install_nvcc.sh" >&2
    bash "$ROOT/scripts/install_nvcc.sh" >&2
    NVCC="$ROOT/.tools/nvcc/nvidia/cu13/bin/nvcc"
fi

ARCHS=("$@")
if [ ${#ARCHS[@]} -eq 0 ]; then ARCHS=(sm_80 sm_90); fi

shopt -s nullglob
SOURCES=(kernels/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
    echo "check_kernels.sh: no kernels/*.cu to check" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
printf '%-44s %-6s %5s %6s %6s %6s %6s\n' kernel arch regs spill_st spill_ld stack smem
printf '%s\n' "-----------------------------------------------------------------------------------"

failures=0
for src in "${SOURCES[@]}"; do
    name="$(basename "$src" .cu)"
    for arch in "${ARCHS[@]}"; do
        log="$WORK/$name.$arch.log"
        if ! "$NVCC" -cubin -O3 -std=c++17 -arch="$arch" -I kernels -Xptxas -v \
            "$src" -o "$WORK/$name.$arch.cubin" >"$log" 2>&1; then
            echo "FAIL: $src does not compile for $arch:" >&2
            cat "$log" >&2
            failures=$((failures + 1))
            continue
        fi
        # ptxas -v prints, per function:
        #   Compiling entry function 'NAME' for 'sm_XX'         (entry points only)
        #   Function properties for NAME
        #       N bytes stack frame, N bytes spill stores, N bytes spill loads
        #   Used N registers, ... N bytes smem, ...
        # Non-entry functions (not inlined) get the properties line too: they are checked as well.
        awk -v arch="$arch" '
            function flush() {
                if (fn != "") {
                    printf "%-44s %-6s %5s %6s %6s %6s %6s\n", fn, arch, regs, spill_st, spill_ld, stack, smem
                    if (spill_st + 0 > 0 || spill_ld + 0 > 0 || stack + 0 > 0) bad++
                }
                fn = ""; regs = "-"; spill_st = 0; spill_ld = 0; stack = 0; smem = 0
            }
            /Function properties for/ { flush(); fn = $NF }
            /bytes stack frame/ {
                for (i = 1; i <= NF; i++) {
                    if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i
                    if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^stores/) spill_st = $i
                    if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^loads/) spill_ld = $i
                }
            }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) {
                    if ($i == "Used") regs = $(i+1)
                    if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
                }
            }
            END { flush(); exit bad > 0 ? 1 : 0 }
        ' "$log" || failures=$((failures + 1))
    done
done

CUOBJDUMP="$ROOT/.tools/sass/nvidia/cu13/bin/cuobjdump"
if [ ! -x "$ROOT/.tools/sass/nvidia/cu13/bin/nvdisasm" ]; then bash "$ROOT/scripts/install_nvcc.sh" >&2; fi
SM90_CUBINS=("$WORK"/*.sm_90.cubin)
if [ ${#SM90_CUBINS[@]} -gt 0 ]; then
    echo
    echo "hot loops (sm_90 SASS): instructions per element, bounds from kernels/sass_bounds.txt"
    python3 "$ROOT/scripts/sass_loop_counts.py" "$CUOBJDUMP" --bounds "$ROOT/kernels/sass_bounds.txt" \
        "${SM90_CUBINS[@]}" || failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
    echo "check_kernels.sh: FAILED ($failures kernel file/arch combination(s) with a spill, a stack frame or a compile error, or a hot loop past its bound)" >&2
    exit 1
fi
echo "check_kernels.sh: OK (no spills, no stack frames, hot loops within their bounds)"
