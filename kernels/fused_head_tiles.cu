// fused_head_tiles.cu — the fused LM head's own kernels on one f32 logits tile (issue 12, CUDA half).
// Host side and the order of calls: src/cuda/fused_head/. CPU twin and definition of the math:
// src/fused_head/ (tile_math.rs: the row state, its merge, the in-place tile gradient).
//
// A tile is `[tile_rows, width]` f32, row-major, written by a cuBLAS GEMM (hidden · W_tileᵀ); the
// bias is added here, on the fly. The rows are the *counted* rows of the batch (label not ignored),
// gathered once; `row_index` maps them back. Every reduction has a fixed order (a row's threads in a
// fixed tree, the tiles in vocabulary order by the host, ∂bias over the tile's rows in order), so
// the results are the same bits run after run; no float atomics.
#include "halo_common.cuh"
#include "online_lse.cuh"

#define FUSED_THREADS 128
#define FUSED_WARPS (FUSED_THREADS / 32)
#define FUSED_ELEMENTWISE_THREADS 256

// The row's (max, Σ exp(z − max), probe) over this block's threads: butterflies inside each warp,
// then the warps merged by thread 0 in warp order. Valid in thread 0 only.
__device__ __forceinline__ OnlineLse fused_block_reduce(OnlineLse s) {
    __shared__ float warp_max[FUSED_WARPS], warp_sum[FUSED_WARPS], warp_probe[FUSED_WARPS];
    s = online_lse_group_reduce(s, 32);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        warp_max[warp] = s.max;
        warp_sum[warp] = s.sum;
        warp_probe[warp] = s.probe;
    }
    __syncthreads();
    OnlineLse total = online_lse_empty();
    if (threadIdx.x == 0) {
        for (int w = 0; w < FUSED_WARPS; w++) {
            OnlineLse o;
            o.max = warp_max[w];
            o.sum = warp_sum[w];
            o.probe = warp_probe[w];
            total = online_lse_merge(total, o);
        }
    }
    __syncthreads();  // the shared partials may be reused by the caller's next use
    return total;
}

// One block per tile row: merges the row's logits `tile[row, :] + bias` into its running state
// (state_max, state_sum, state_probe) and, when the label lies in this tile, records its logit.
// `labels`, the states and `tile` start at the tile's first row; `bias` (nullable) at the tile's
// first vocabulary entry, `vocab_start` is that entry's id.
extern "C" __global__ void __launch_bounds__(FUSED_THREADS) fused_head_tile_forward(
    const float* __restrict__ tile, int64_t width, const float* __restrict__ bias, const int32_t* __restrict__ labels,
    int64_t vocab_start, float* __restrict__ state_max, float* __restrict__ state_sum,
    float* __restrict__ state_probe, float* __restrict__ label_logit) {
    const int64_t row = blockIdx.x;
    const float* z = tile + row * width;
    OnlineLse s = online_lse_empty();
    for (int64_t v = threadIdx.x; v < width; v += FUSED_THREADS) {
        const float x[1] = {z[v] + (bias ? bias[v] : 0.0f)};
        online_lse_add<1>(s, x);
    }
    const OnlineLse tile_state = fused_block_reduce(s);
    if (threadIdx.x == 0) {
        OnlineLse before;
        before.max = state_max[row];
        before.sum = state_sum[row];
        before.probe = state_probe[row];
        const OnlineLse merged = online_lse_merge(before, tile_state);
        state_max[row] = merged.max;
        state_sum[row] = merged.sum;
        state_probe[row] = merged.probe;
        const int64_t y = int64_t(labels[row]) - vocab_start;
        if (y >= 0 && y < width) label_logit[row] = z[y] + (bias ? bias[y] : 0.0f);
    }
}

// The empty state of `n` rows: max −inf, sum 0, probe 0, label logit 0.
extern "C" __global__ void fused_head_state_reset(float* __restrict__ state_max, float* __restrict__ state_sum,
                                                  float* __restrict__ state_probe, float* __restrict__ label_logit,
                                                  int64_t n) {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
        state_max[r] = -INFINITY;
        state_sum[r] = 0.0f;
        state_probe[r] = 0.0f;
        label_logit[r] = 0.0f;
    }
}

// Per counted row r: logp, lse, row max and ln Σ, written at row_index[r] (the other rows keep the
// zeros the host put there). A non-finite logit (probe) or log-prob reports the counted row in
// status[HALO_STATUS_NONFINITE] (the smallest such r).
extern "C" __global__ void fused_head_finalize(const float* __restrict__ state_max, const float* __restrict__ state_sum,
                                               const float* __restrict__ state_probe,
                                               const float* __restrict__ label_logit,
                                               const int32_t* __restrict__ row_index, int64_t n,
                                               float* __restrict__ logp, float* __restrict__ lse,
                                               float* __restrict__ row_max, float* __restrict__ ln_sum,
                                               int32_t* __restrict__ status) {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
        const float m = state_max[r];
        const float l = logf(state_sum[r]);
        // `(z_y − max) − ln Σ`, the CPU op's order (exact subtraction first); clamp rounding.
        const float lp = fminf((label_logit[r] - m) - l, 0.0f);
        if (!(state_probe[r] < INFINITY) || !isfinite(lp)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)r);
        const int64_t out = row_index[r];
        logp[out] = lp;
        lse[out] = m + l;
        row_max[out] = m;
        ln_sum[out] = l;
    }
}

// One block per tile row: overwrites the row's logits with ∂L/∂z = g · (1[v = y] − p_v),
// p_v = exp((z_v − max) − ln Σ) (max and ln Σ kept apart: one f32 lse near 1000 would cost 6e-5 of
// relative error in every p). The saved values and `grad` are per counted row, from the tile's first
// row; a non-finite logit reports `row_base + row` (its counted row) in status.
extern "C" __global__ void __launch_bounds__(FUSED_THREADS) fused_head_tile_backward(
    float* __restrict__ tile, int64_t width, const float* __restrict__ bias, const int32_t* __restrict__ labels,
    int64_t vocab_start, const float* __restrict__ row_max, const float* __restrict__ ln_sum,
    const float* __restrict__ grad, int64_t row_base, int32_t* __restrict__ status) {
    const int64_t row = blockIdx.x;
    float* z = tile + row * width;
    const float m = row_max[row], l = ln_sum[row], g = grad[row];
    const int64_t y = int64_t(labels[row]) - vocab_start;
    // A non-finite saved value or upstream gradient (the host names which from its own copy).
    if (threadIdx.x == 0 && !(isfinite(m) && isfinite(l) && isfinite(g)))
        atomicMin(&status[HALO_STATUS_NONFINITE_GRAD], (int32_t)(row_base + row));
    float probe = 0.0f;
    for (int64_t v = threadIdx.x; v < width; v += FUSED_THREADS) {
        const float x = z[v] + (bias ? bias[v] : 0.0f);
        probe = halo_max_abs_nan(probe, x);
        const float d = -g * expf((x - m) - l);
        z[v] = v == y ? d + g : d;
    }
    if (!(probe < INFINITY)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)(row_base + row));
}

// ∂bias[v] += Σ_rows ∂z[row, v] over one tile (rows in order: deterministic), one thread per column.
extern "C" __global__ void fused_head_bias_grad(const float* __restrict__ tile, int64_t rows, int64_t width,
                                                float* __restrict__ grad_bias) {
    const int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (v >= width) return;
    float s = 0.0f;
    for (int64_t r = 0; r < rows; r++) s += tile[r * width + v];
    grad_bias[v] += s;
}

// out[r, :] = hidden[row_index[r], :] for the n counted rows (converted to O).
template <typename T, typename O>
__device__ __forceinline__ void fused_gather_rows(const T* __restrict__ hidden, const int32_t* __restrict__ row_index,
                                                  int64_t n, int64_t h, O* __restrict__ out) {
    const int64_t total = n * h;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / h, k = i - r * h;
        out[i] = Elem<O>::from_f32(Elem<T>::to_f32(hidden[int64_t(row_index[r]) * h + k]));
    }
}

#define FUSED_GATHER(NAME, T, O)                                                                          \
    extern "C" __global__ void NAME(const T* __restrict__ hidden, const int32_t* __restrict__ row_index,  \
                                    int64_t n, int64_t h, O* __restrict__ out) {                          \
        fused_gather_rows<T, O>(hidden, row_index, n, h, out);                                            \
    }
FUSED_GATHER(fused_head_gather_f32, float, float)
FUSED_GATHER(fused_head_gather_bf16, __nv_bfloat16, __nv_bfloat16)
FUSED_GATHER(fused_head_gather_f16, __half, __half)
FUSED_GATHER(fused_head_gather_wide_bf16, __nv_bfloat16, float)
FUSED_GATHER(fused_head_gather_wide_f16, __half, float)

// out[i] = f32(in[i]): a bf16 / f16 weight tile or bias widened for the f32 GEMMs of the backward.
#define FUSED_WIDEN(SUFFIX, T)                                                                             \
    extern "C" __global__ void fused_head_widen_##SUFFIX(const T* __restrict__ in, int64_t count,          \
                                                         float* __restrict__ out) {                        \
        for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;                        \
             i += int64_t(gridDim.x) * blockDim.x)                                                         \
            out[i] = Elem<T>::to_f32(in[i]);                                                               \
    }
FUSED_WIDEN(bf16, __nv_bfloat16)
FUSED_WIDEN(f16, __half)

// dst[row_index[r], :] = src[r, :]: the counted rows' ∂hidden back to the batch's rows.
extern "C" __global__ void fused_head_scatter_rows(const float* __restrict__ src, const int32_t* __restrict__ row_index,
                                                   int64_t n, int64_t h, float* __restrict__ dst) {
    const int64_t total = n * h;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / h, k = i - r * h;
        dst[int64_t(row_index[r]) * h + k] = src[i];
    }
}

// status[slot] = the smallest row (count / row_len rows) holding a non-finite value: the backward's
// check that finite inputs did not overflow a gradient to ±inf.
extern "C" __global__ void fused_head_first_nonfinite(const float* __restrict__ x, int64_t count, int64_t row_len,
                                                      int32_t* __restrict__ status, int32_t slot) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
        if (!isfinite(x[i])) atomicMin(&status[slot], (int32_t)(i / row_len));
    }
}
