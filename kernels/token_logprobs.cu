// token_logprobs.cu — forward of the per-token log-prob gather:
//   lse[r] + lse_residual[r] = logsumexp(z[r, :]) (lse rounded to f32, residual its rounding error),  logp[r] = min((z[r, y_r] − max_r) − ln Σ_v exp(z[r, v] − max_r), 0)   (0, 0 where y_r is ignored).
// CPU twin and definition: src/cpu/token_logprobs.rs.
//
// One pass over each row: every thread keeps an online (max, Σexp) state over 16-byte vector loads
// (4 f32 or 8 bf16/f16 per load, four loads in flight per iteration; online_lse.cuh's fast form:
// per element one max, one NaN/inf probe, one FFMA, one EX2, one add), then the row's threads merge
// their states with a butterfly (and, for rows wider than a warp, through shared memory in a fixed
// order). Rows whose label is ignored are never read. Launch geometry: kernels/README.md.
#include "halo_common.cuh"
#include "online_lse.cuh"
#include "reductions.cuh"
#include "split_rows.cuh"

// The exact two-step scan of this thread's share of the row (the same elements as scan_row_fast:
// head, vectors, tail, as each thread of the row picks its form alone): the fallback for a share
// whose max ends beyond ±2^24 (HALO_EX2_FMA_LIMIT), where the fast form's terms would overflow.
template <typename T>
__device__ __forceinline__ OnlineLse scan_row_exact(const T* __restrict__ row, int64_t vocab, int lane, int stride) {
    constexpr int VEC = Elem<T>::VEC;
    OnlineLse s = online_lse_empty();
    const int64_t head = head_to_alignment(row, vocab);
    for (int64_t j = lane; j < head; j += stride) {
        const float x[1] = {Elem<T>::to_f32(row[j])};
        online_lse_add<1>(s, x);
    }
    const uint4* vecs = reinterpret_cast<const uint4*>(row + head);
    const int64_t n_vecs = (vocab - head) / VEC;
    for (int64_t i = lane; i < n_vecs; i += stride) {
        float x[VEC];
        unpack_vec<T>(__ldg(vecs + i), x);
        online_lse_add<VEC>(s, x);
    }
    for (int64_t j = head + n_vecs * VEC + lane; j < vocab; j += stride) {
        const float x[1] = {Elem<T>::to_f32(row[j])};
        online_lse_add<1>(s, x);
    }
    return s;
}

template <typename T>
__device__ __forceinline__ void fast_scalar(FastLse& f, const T* p) {
    const float x[1] = {Elem<T>::to_f32(p[0])};
    fast_lse_add<1>(f, x);
}

// This thread's share of one row in the fast form: elements lane, lane + stride, ... in three parts
// — a scalar head up to the first 16-byte boundary (odd vocab makes row starts unaligned), aligned
// vectors (four 16-byte loads in flight, their 16 or 32 elements one chunk of the online state, so
// the max is raised once per chunk), a scalar tail.
template <typename T>
__device__ __forceinline__ FastLse scan_row_fast(const T* __restrict__ row, int64_t vocab, int lane, int stride) {
    constexpr int VEC = Elem<T>::VEC;
    FastLse f = fast_lse_empty();
    const int64_t head = head_to_alignment(row, vocab);
    for (int64_t j = lane; j < head; j += stride) fast_scalar<T>(f, row + j);  // head may exceed stride
    const uint4* vecs = reinterpret_cast<const uint4*>(row + head);
    const int64_t n_vecs = (vocab - head) / VEC;
    // Trips of four vectors lane + 4·stride·t + {0, 1, 2, 3}·stride: a 32-bit count and one pointer,
    // so the loop's bookkeeping is a few instructions a trip (past 2^31 − 1 trips, which no real
    // vocab reaches, the one-vector loop below takes the rest).
    const int64_t quad = 4 * (int64_t)stride;
    const int64_t full = n_vecs > lane + 3 * (int64_t)stride ? (n_vecs - lane - 3 * (int64_t)stride + quad - 1) / quad : 0;
    const int trips = full < 2147483647 ? (int)full : 2147483647;
    const uint4* v0 = vecs + lane;
    #pragma unroll 1
    for (int t = 0; t < trips; t++, v0 += quad) {
        const uint4 v[4] = {__ldg(v0), __ldg(v0 + stride), __ldg(v0 + 2 * stride), __ldg(v0 + 3 * stride)};
        fast_lse_raise(f, vecs_max<T, 4>(v));
        float add = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float x[VEC];
            unpack_vec<T>(v[q], x);
            add += fast_lse_terms<VEC>(f, x);
        }
        f.sum += add;
    }
    for (int64_t i = lane + (int64_t)trips * quad; i < n_vecs; i += stride) {
        float x[VEC];
        unpack_vec<T>(__ldg(vecs + i), x);
        fast_lse_add<VEC>(f, x);
    }
    for (int64_t j = head + n_vecs * VEC + lane; j < vocab; j += stride) fast_scalar<T>(f, row + j);
    return f;
}

template <typename T>
__device__ __forceinline__ OnlineLse scan_row(const T* __restrict__ row, int64_t vocab, int lane, int stride) {
    const FastLse f = scan_row_fast<T>(row, vocab, lane, stride);
    if (!fast_lse_exact_needed(f)) return fast_to_natural(f);
    return scan_row_exact<T>(row, vocab, lane, stride);
}

// The row's final outputs from its merged state, by the row's first thread (of the merging block
// when the row is split).
__device__ __forceinline__ void finish_forward_row(const OnlineLse& s, float z_label, int64_t row,
                                                   float* __restrict__ logp, float* __restrict__ lse,
                                                   float* __restrict__ lse_residual, int32_t* __restrict__ status) {
    if (!online_lse_finite(s)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)row);
    const float ln_sum = logf(s.sum);
    float row_lse, residual;
    split_lse(s.max, ln_sum, row_lse, residual);
    lse[row] = row_lse;
    lse_residual[row] = residual;
    // `(z[y] − max) − ln Σ` (PyTorch's log_softmax order, as the CPU op), not `z[y] − lse`: with
    // logits near 1e4, lse rounds to ulp(max) ≈ 1e-3, which would swamp a small log-prob, while
    // `z[y] − max` is exact whenever it is small. The clamp guards rounding when one entry dominates.
    const float row_logp = fminf((z_label - s.max) - ln_sum, 0.0f);
    // Finite logits whose spread exceeds f32 give a log-prob beyond f32: refused, as the CPU does.
    if (!isfinite(row_logp)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)row);
    logp[row] = row_logp;
}

// Split rows (split_rows.cuh): the row's merged state, in the block that arrives last; every other
// block of the row gets `false` (block-uniform) and is done. `s` is the block's state of its slice
// (valid in thread 0). The merge: the largest max first (exact, order-free), then the slices' sums
// rescaled to it and added in slice order 0, 1, 2, … — the same bits whichever block came last.
__device__ __forceinline__ bool merge_forward_slices(OnlineLse& s, int64_t row, int splits,
                                                     float* __restrict__ partials, unsigned* __restrict__ arrivals) {
    __shared__ float slice_max[HALO_MAX_ROW_SPLITS];
    __shared__ float slice_sum[HALO_MAX_ROW_SPLITS];
    __shared__ float slice_probe[HALO_MAX_ROW_SPLITS];
    const int slice = split_slice(splits);
    if (!split_publish_and_arrive(partials, arrivals, row, splits, slice, s.max, s.sum, s.probe)) return false;
    split_gather(partials, row, splits, slice_max, slice_sum, slice_probe);
    if (threadIdx.x != 0) return false;
    float m = slice_max[0], probe = slice_probe[0];
    for (int k = 1; k < splits; k++) {
        m = fmaxf(m, slice_max[k]);
        probe = halo_max_abs_nan(probe, slice_probe[k]);
    }
    float sum = 0.0f;
    for (int k = 0; k < splits; k++) sum += slice_sum[k] * rescale_factor(slice_max[k], m);
    s.max = m;
    s.sum = sum;
    s.probe = probe;
    return true;
}

// Split = false: rows_per_block rows per block (kernels/README.md). Split = true: `splits` blocks
// per row, block b scanning slice b % splits of row b / splits (split_rows.cuh).
template <typename T, bool Split>
__device__ __forceinline__ void token_logprobs_forward(const T* __restrict__ logits, const int32_t* __restrict__ labels,
                                                       float* __restrict__ logp, float* __restrict__ lse,
                                                       float* __restrict__ lse_residual, int32_t* __restrict__ status,
                                                       float* __restrict__ partials, unsigned* __restrict__ arrivals,
                                                       int splits, HaloTokenParams p) {
    // Per-warp partial states of rows wider than a warp (HALO_TOKEN_THREADS / 32 warps).
    __shared__ float warp_max[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_sum_exp[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_probe[HALO_TOKEN_THREADS / 32];

    const int threads_per_row = Split ? HALO_TOKEN_THREADS : HALO_TOKEN_THREADS / p.rows_per_block;
    const int local_row = Split ? 0 : threadIdx.x / threads_per_row;
    const int lane = Split ? (int)threadIdx.x : threadIdx.x % threads_per_row;
    const int64_t row = Split ? (int64_t)(blockIdx.x / splits) : (int64_t)blockIdx.x * p.rows_per_block + local_row;
    const RowSlice slice = Split ? row_slice(p.vocab, splits, split_slice(splits)) : RowSlice{0, p.vocab};
    const bool in_range = row < p.rows;
    const int32_t label = in_range ? labels[row] : p.ignore_index;
    const bool ignored = label == p.ignore_index;
    const bool bad_label = !ignored && (label < 0 || (int64_t)label >= p.vocab);
    const bool active = in_range && !ignored && !bad_label;
    // A split row that is not read is reported and zeroed by its first slice's block alone.
    if (Split && !active && split_slice(splits) != 0) return;

    // The label's logit is loaded before the scan so its latency hides behind it.
    float z_label = 0.0f;
    if (active && lane == 0) z_label = Elem<T>::to_f32(logits[row * p.vocab + label]);
    OnlineLse s = online_lse_empty();
    if (active) s = scan_row(logits + row * p.vocab + slice.begin, slice.end - slice.begin, lane, threads_per_row);

    // Every thread takes part in the reductions (uniform control flow), active or not.
    s = online_lse_group_reduce(s, threads_per_row < 32 ? threads_per_row : 32);
    if (threads_per_row > 32) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) {
            warp_max[warp] = s.max;
            warp_sum_exp[warp] = s.sum;
            warp_probe[warp] = s.probe;
        }
        __syncthreads();
        const int warps_per_row = threads_per_row >> 5;
        const int first = local_row * warps_per_row;
        OnlineLse r = {warp_max[first], warp_sum_exp[first], warp_probe[first]};
        for (int w = 1; w < warps_per_row; w++) {
            OnlineLse o = {warp_max[first + w], warp_sum_exp[first + w], warp_probe[first + w]};
            r = online_lse_merge(r, o);
        }
        s = r;
    }

    if (Split && active && !merge_forward_slices(s, row, splits, partials, arrivals)) return;
    if (!in_range || lane != 0) return;
    if (bad_label) atomicMin(&status[HALO_STATUS_BAD_LABEL], (int32_t)row);
    if (!active) {
        logp[row] = 0.0f;
        lse[row] = 0.0f;
        lse_residual[row] = 0.0f;
        return;
    }
    finish_forward_row(s, z_label, row, logp, lse, lse_residual, status);
}

#define HALO_TOKEN_FORWARD(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS) token_logprobs_forward_##SUFFIX(            \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, float* __restrict__ logp,              \
        float* __restrict__ lse, float* __restrict__ lse_residual, int32_t* __restrict__ status,                 \
        HaloTokenParams p) {                                                                                      \
        token_logprobs_forward<T, false>(logits, labels, logp, lse, lse_residual, status, nullptr, nullptr, 1, p); \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS) token_logprobs_forward_split_##SUFFIX(      \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, float* __restrict__ logp,              \
        float* __restrict__ lse, float* __restrict__ lse_residual, int32_t* __restrict__ status,                 \
        float* __restrict__ partials, unsigned* __restrict__ arrivals, int32_t splits, HaloTokenParams p) {      \
        token_logprobs_forward<T, true>(logits, labels, logp, lse, lse_residual, status, partials, arrivals,     \
                                        splits, p);                                                               \
    }

HALO_TOKEN_FORWARD(f32, float)
HALO_TOKEN_FORWARD(bf16, __nv_bfloat16)
HALO_TOKEN_FORWARD(f16, __half)
