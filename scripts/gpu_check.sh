#!/usr/bin/env bash
# GPU validation of the CUDA backend: the GPU test suite, the same tests under compute-sanitizer
# (memcheck, racecheck) and the benches. Two steps, because the lent GPU machine has no Rust
# toolchain and no network:
#
#   1. Here (any machine with cargo, no GPU needed):
#        bash scripts/gpu_check.sh prepare
#      installs nvcc (scripts/install_nvcc.sh), builds the test and bench binaries with the kernels
#      compiled to PTX (embedded in the binaries) and copies them to .tools/gpu_bin/ (git-ignored).
#   2. On the GPU machine, with .tools/gpu_bin carried along (device tool: carry [".tools/gpu_bin"]):
#        bash scripts/gpu_check.sh run [tests,sanitize,bench]
#      runs the chosen steps (default: all three), writes logs and summary.txt to $OUT (or
#      ./gpu_check_out), and exits non-zero if any step failed. Where cargo IS available and
#      .tools/gpu_bin is absent, `run` builds first. With a 10-minute limit per command, run the
#      steps as separate commands: `run tests`, `run sanitize`, `run bench`.
#
# Environment: HALO_SANITIZER_TIMEOUT (seconds, default 240) bounds each compute-sanitizer run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN_DIR="$ROOT/.tools/gpu_bin"
MODE="${1:-run}"
STEPS="${2:-tests,sanitize,bench}"
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

# The newest executable cargo built for `name` (tests/benches land in target/release/deps).
newest_binary() {
    local target_dir="$1" name="$2"
    find "$target_dir/release/deps" -maxdepth 1 -type f -executable -name "${name}-*" \
        ! -name '*.d' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n 1 | cut -d' ' -f2-
}

# One test body per op, run on the CPU and on CUDA (here the real GPU: HALO_REQUIRE_GPU=1).
# The fused LM head's (issue 12) need libcublas on the GPU machine (loaded at run time).
DEVICE_TESTS="device_token_logprobs device_sequence_sums device_losses device_pipeline cuda_beyond_2_31 cuda_gemm fused_head_cuda fused_head_steps_cuda cuda_split_rows"
# halo-train's CUDA tests: the model's kernels against their CPU twins, the tape and whole training
# runs on the GPU against the CPU (each picks the real GPU when there is one).
TRAIN_TESTS="cuda_nn_layers cuda_nn_attention cuda_nn_optim device_tape device_training"

prepare() {
    set -e
    bash "$ROOT/scripts/install_nvcc.sh"
    local target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    # --no-run: build only. The bench profile is release + line tables, like the tests.
    cargo test --release --no-run --test cuda_kernels --test cuda_no_gpu \
        --test device_token_logprobs --test device_sequence_sums --test device_losses --test device_pipeline --test cuda_beyond_2_31 \
        --test cuda_gemm --test fused_head_cuda --test fused_head_steps_cuda --test cuda_split_rows
    cargo bench --no-run --bench cuda_ops --bench fused_head
    cargo test --release --no-run -p halo-train $(printf -- '--test %s ' $TRAIN_TESTS)
    cargo bench --no-run -p halo-train --bench train_step --bench gpt2_kto_step
    mkdir -p "$BIN_DIR"
    for name in cuda_kernels cuda_no_gpu cuda_ops fused_head train_step gpt2_kto_step $DEVICE_TESTS $TRAIN_TESTS; do
        local bin
        bin="$(newest_binary "$target_dir" "$name")"
        if [ -z "$bin" ]; then
            echo "gpu_check.sh: no built binary for $name under $target_dir" >&2
            exit 1
        fi
        cp "$bin" "$BIN_DIR/$name"
        # Keep symbols and line tables small enough to carry (the device tool's 64 MiB limit).
        strip --strip-debug "$BIN_DIR/$name" 2>/dev/null || true
    done
    # The binaries embed the PTX; check one really has kernels (not a build without nvcc).
    if ! grep -q "token_logprobs_forward_bf16" "$BIN_DIR/cuda_kernels"; then
        echo "gpu_check.sh: the test binary has no embedded PTX: was nvcc found at build time?" >&2
        exit 1
    fi
    du -sh "$BIN_DIR"
    echo "prepared: carry .tools/gpu_bin to the GPU machine and run: bash scripts/gpu_check.sh run"
}

# cudarc 0.19 (feature cuda-12080) looks libcublas up as libcublas.so, .so.12, .11, .10, .9, .1 —
# never .so.13, the only name a CUDA-13-only machine (the lent GPUs: driver 580 / CUDA 13.0) may
# have. If none of its names resolves but a libcublas.so.13 exists, put a libcublas.so link to it in
# a private directory on LD_LIBRARY_PATH (set before the test processes start, which is when the
# loader reads it). The fused-head tests need cuBLAS; without one they fail, they do not skip.
cublas_lookup() {
    local name
    for name in libcublas.so libcublas.so.12 libcublas.so.11; do
        if ldconfig -p 2>/dev/null | grep -q " $name "; then
            note "cuBLAS: $name found by the loader"
            return
        fi
    done
    local found
    found="$( (ldconfig -p 2>/dev/null | awk '/ libcublas\.so\.13 /{print $NF; exit}'); \
        ls /usr/local/cuda/lib64/libcublas.so.13 /usr/local/cuda/targets/*/lib/libcublas.so.13 \
        /usr/lib/x86_64-linux-gnu/libcublas.so.13 2>/dev/null | head -n 1)"
    found="$(echo "$found" | head -n 1)"
    if [ -z "$found" ]; then
        note "cuBLAS: no libcublas found (the fused-head GPU tests will fail with CudaUnavailable)"
        return
    fi
    local shim
    shim="$(mktemp -d)"
    mkdir -p "$shim"
    ln -sf "$found" "$shim/libcublas.so"
    export LD_LIBRARY_PATH="$shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "cuBLAS: $found, reached as libcublas.so through $shim"
}

run() {
    local out="${OUT:-$ROOT/gpu_check_out}"
    mkdir -p "$out"
    local summary="$out/summary.txt"
    : >"$summary"
    local failed=0
    note() { echo "$*" | tee -a "$summary"; }
    step() { # step NAME LOGFILE COMMAND...
        local name="$1" log="$2"
        shift 2
        echo "== $name: $*"
        local start=$SECONDS
        "$@" >"$out/$log" 2>&1
        local rc=$?
        tail -n 40 "$out/$log"
        if [ $rc -eq 0 ]; then
            note "PASS $name ($((SECONDS - start)) s, log $log)"
        else
            note "FAIL $name (exit $rc, $((SECONDS - start)) s, log $log)"
            failed=1
        fi
    }

    if [ ! -x "$BIN_DIR/cuda_kernels" ]; then
        if command -v cargo >/dev/null 2>&1; then
            prepare
        else
            echo "gpu_check.sh: no $BIN_DIR and no cargo here: run 'bash scripts/gpu_check.sh prepare' on a machine with cargo and carry .tools/gpu_bin" >&2
            exit 2
        fi
    fi

    {
        echo "date: $(date -u)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    } | tee -a "$summary"

    cublas_lookup

    if wants tests; then
        export HALO_REQUIRE_GPU=1
        step "gpu tests" tests.log "$BIN_DIR/cuda_kernels" --test-threads 4
        # Without a usable GPU the suite reports every test as ignored (exit 0): no pass here.
        if ! grep -q "test result: ok.* 0 ignored" "$out/tests.log"; then
            note "FAIL gpu tests: some tests were ignored or did not finish (no usable GPU?)"
            failed=1
        fi
        for name in $DEVICE_TESTS; do
            step "device tests $name (cpu + real GPU)" "$name.log" "$BIN_DIR/$name" --test-threads 4
        done
        for name in $TRAIN_TESTS; do
            # The round-trip count needs the emulated device's counters.
            step "training tests $name (real GPU)" "$name.log" "$BIN_DIR/$name" --test-threads 2 \
                --skip host_round_trips
        done
        step "no-gpu tests (on a GPU machine)" no_gpu_tests.log "$BIN_DIR/cuda_no_gpu" --test-threads 1
    fi

    local sanitizer
    sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
    if ! wants sanitize; then
        :
    elif [ -n "$sanitizer" ]; then
        local limit="${HALO_SANITIZER_TIMEOUT:-240}"
        # The 8192 x 128256 cases are skipped: under instrumentation they take far too long.
        step "memcheck" memcheck.log timeout "$limit" "$sanitizer" --tool memcheck --error-exitcode 97 \
            "$BIN_DIR/cuda_kernels" --test-threads 1 --skip large
        step "racecheck" racecheck.log timeout "$limit" "$sanitizer" --tool racecheck --error-exitcode 97 \
            "$BIN_DIR/cuda_kernels" --test-threads 1 --skip large --skip deterministic
        # Split rows: blocks of one row publish partials and the last one merges them (a pattern
        # the emulated device, which runs blocks one after another, cannot race).
        step "memcheck split rows" memcheck_split.log timeout "$limit" "$sanitizer" --tool memcheck \
            --error-exitcode 97 "$BIN_DIR/cuda_split_rows" --test-threads 1 --skip random_shapes
        step "racecheck split rows" racecheck_split.log timeout "$limit" "$sanitizer" --tool racecheck \
            --error-exitcode 97 "$BIN_DIR/cuda_split_rows" --test-threads 1 --skip random_shapes
    else
        note "SKIP compute-sanitizer: not found on this machine"
    fi

    if wants bench; then
        # Run the criterion binary directly: `--bench` selects benchmarking (not its test mode).
        step "benches" bench.log "$BIN_DIR/cuda_ops" --bench
        grep -A 40 '^summary' "$out/bench.log" >>"$summary" || true
        # The fused LM head on the GPU against the bare cuBLAS GEMMs of the same shapes (GPU
        # variants only, no criterion: the side-by-side lines with peak device memory).
        step "fused head bench" fused_head_bench.log env HALO_FUSED_BENCH_GPU_ONLY=1 \
            HALO_FUSED_BENCH_SUMMARY=1 "$BIN_DIR/fused_head" --bench
        grep -E '^[0-9]+x|GPU' "$out/fused_head_bench.log" >>"$summary" || true
        step "training step bench (CPU beside GPU)" train_step_bench.log env HALO_BENCH_BEST_ONLY=1 \
            "$BIN_DIR/train_step" --bench
        grep -E '^best of|^gpu' "$out/train_step_bench.log" >>"$summary" || true
        # GPT-2 124M KTO step (issue 13's 2×-of-PyTorch goal): ms and tokens/s per step.
        step "GPT-2 124M KTO step" gpt2_kto_step.log "$BIN_DIR/gpt2_kto_step"
        grep -E '^gpt2_kto_step' "$out/gpt2_kto_step.log" >>"$summary" || true
    fi

    echo
    cat "$summary"
    exit $failed
}

case "$MODE" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: $0 [prepare|run]" >&2
        exit 2
        ;;
esac
