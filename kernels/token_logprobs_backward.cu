// token_logprobs_backward.cu — backward of the log-prob gather, from the saved logsumexp (the f32 lse
// and its rounding residual, which may be absent = 0):
//   ∂L/∂z[r, v] = g_r · (1[v = y_r] − exp(z[r, v] − lse_r − residual_r)),   whole row 0 where y_r is ignored.
// CPU twin and definition: src/cpu/token_logprobs_backward.rs. Read once, write once, in the logits'
// dtype; the in-place form overwrites the logits (dead after the backward), saving a [rows, vocab]
// buffer. Launch geometry as the forward: kernels/README.md.
//
// Checks, in the same pass as the write: every thread keeps Σ exp(z − lse), a NaN/inf probe max |z|
// (NaN-propagating), and for f16/bf16 the largest |stored value|; the row's threads reduce them and its first thread
// reports the row's first fault (status slots HALO_STATUS_BWD_*, in the CPU op's order).
#include "halo_common.cuh"
#include "reductions.cuh"
#include "split_rows.cuh"

// What a thread has seen of its row.
struct RowProbe {
    float sum;      // Σ exp(z − lse)
    float probe;    // max |z|, NaN once a NaN was seen: < inf while every z is finite
    float max_abs;  // max |w| over the values written by the scalar loops (f16/bf16 only: the overflow probe)
    // f16/bf16: per half, the largest z of the vector loop (packed pairs, one max per two elements);
    // its |w| is the vector loop's max |w|, as w = neg_gc·p rises with z (see below).
    unsigned z_max_word;
};

// The row's constants of exp(z − lse − residual) = c · 2^(z·log2e − lse_l2):
//  * fast rows (|lse| ≤ 2^24, HALO_EX2_FMA_LIMIT): lse_l2 = round(lse·log2e), one FFMA per element; the rounding of
//    lse_l2, err = lse·log2e − lse_l2 (exact by one FMA), and the residual go into the per-row
//    c = 2^(−err − residual·log2e). So the exponent is as exact as the two-step (z − lse)·log2e:
//    both round once near 0, where the probabilities that matter are; only the (exact) row constant
//    moved. (Without err, an lse of 1e4 would put a 6e-4 relative error in every p.)
//  * other rows (an lse beyond 2^24, or not finite): the two-step form exp2((z − lse)·log2e), every
//    element scalar, c = exp(−residual) — rare, and not the hot loop.
struct RowExp {
    bool fast;
    float lse;
    float lse_l2;
    float c;
};

__device__ __forceinline__ RowExp row_exp(float row_lse, float residual) {
    RowExp r;
    r.fast = fabsf(row_lse) <= HALO_EX2_FMA_LIMIT;  // false for NaN
    r.lse = row_lse;
    r.lse_l2 = r.fast ? row_lse * HALO_LOG2E : 0.0f;
    const float err = fmaf(row_lse, HALO_LOG2E, -r.lse_l2);
    r.c = r.fast ? exp2f(-fmaf(residual, HALO_LOG2E, err)) : expf(-residual);
    return r;
}

// exp(z − lse − residual) / c, in the fast form (the vector loop: fast rows only).
__device__ __forceinline__ float prob_fast(float z, const RowExp& r) {
    return halo_ex2_ftz(fmaf(z, HALO_LOG2E, -r.lse_l2));
}
// The same in either form (scalar head, tail and label column).
__device__ __forceinline__ float prob_unscaled(float z, const RowExp& r) {
    return r.fast ? prob_fast(z, r) : exp2f((z - r.lse) * HALO_LOG2E);
}

// −g·p for one element (c folded into neg_gc = −g·c) from its unscaled probability e; the label's
// column is rewritten afterwards by the thread that wrote it (`owner_lane`), so the hot loop has
// no per-column compare.
template <typename T>
__device__ __forceinline__ float grad_element(float z, float e, float neg_gc, RowProbe& s) {
    s.sum += e;
    s.probe = halo_max_abs_nan(s.probe, z);
    const float w = neg_gc * e;
    if (Elem<T>::NARROW) s.max_abs = fmaxf(s.max_abs, fabsf(w));
    return w;
}

// The lane (of the row's threads) that writes column `col` in the head / vector / tail loops.
template <typename T>
__device__ __forceinline__ int owner_lane(int64_t col, int64_t head, int64_t n_vecs, int threads_per_row) {
    const int64_t body_end = head + n_vecs * Elem<T>::VEC;
    const int64_t slot = col < head ? col : col < body_end ? (col - head) / Elem<T>::VEC : col - body_end;
    return (int)(slot & (threads_per_row - 1));  // threads_per_row is a power of two
}

template <typename T, bool InPlace>
__device__ __forceinline__ uint4 load_vec(const uint4* p) {
    // In place the buffer is written by this kernel: plain loads, not the read-only cache path.
    if (InPlace) return load16(p);
    return __ldg(p);
}

// One 16-byte vector of logits -> its gradient vector.
// The packed max of a vector's pairs into the running word (f16/bf16).
template <typename T>
__device__ __forceinline__ void raise_z_max(unsigned& z_max_word, const uint4& v) {
    if (Elem<T>::NARROW) {
        const unsigned m = Elem<T>::max_word(Elem<T>::max_word(v.x, v.y), Elem<T>::max_word(v.z, v.w));
        z_max_word = Elem<T>::max_word(z_max_word, m);
    }
}

template <typename T>
__device__ __forceinline__ uint4 grad_vec(const uint4& v, float neg_gc, const RowExp& r, RowProbe& s) {
    float x[Elem<T>::VEC];
    unpack_vec<T>(v, x);
#pragma unroll
    for (int k = 0; k < Elem<T>::VEC; k++) {
        const float e = prob_fast(x[k], r);
        s.sum += e;
        s.probe = halo_max_abs_nan(s.probe, x[k]);
        x[k] = neg_gc * e;
    }
    return pack_vec<T>(x);
}

__device__ __forceinline__ float group_max(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(HALO_FULL_MASK, v, offset));
    return v;
}

// group_max of non-negative probes, NaN from any lane.
__device__ __forceinline__ float group_max_nan(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2)
        v = halo_max_abs_nan(v, __shfl_xor_sync(HALO_FULL_MASK, v, offset));
    return v;
}

// As `lse_fits_row` in src/cpu/saved_lse.rs: Σp = 1 within HALO_LSE_SUM_TOL + |lse|·2^-23 (false for NaN).
__device__ __forceinline__ bool lse_fits_row(float row_lse, float prob_sum) {
    return fabsf(prob_sum - 1.0f) <= HALO_LSE_SUM_TOL + fabsf(row_lse) * 1.1920928955078125e-7f;
}

// Split rows (split_rows.cuh): the row's checks merged over its slices, in the block that arrives
// last (`false` in every other block, which is done): Σp in slice order 0, 1, 2, …, the probes'
// maxima (order-free). `s` is the block's reduced probe of its slice (valid in thread 0).
__device__ __forceinline__ bool merge_backward_slices(RowProbe& s, int64_t row, int splits,
                                                      float* __restrict__ partials, unsigned* __restrict__ arrivals) {
    __shared__ float slice_sum[HALO_MAX_ROW_SPLITS];
    __shared__ float slice_probe[HALO_MAX_ROW_SPLITS];
    __shared__ float slice_max_abs[HALO_MAX_ROW_SPLITS];
    const int slice = split_slice(splits);
    if (!split_publish_and_arrive(partials, arrivals, row, splits, slice, s.sum, s.probe, s.max_abs)) return false;
    split_gather(partials, row, splits, slice_sum, slice_probe, slice_max_abs);
    if (threadIdx.x != 0) return false;
    float sum = 0.0f, probe = 0.0f, max_abs = 0.0f;
    for (int k = 0; k < splits; k++) {
        sum += slice_sum[k];
        probe = halo_max_abs_nan(probe, slice_probe[k]);
        max_abs = fmaxf(max_abs, slice_max_abs[k]);
    }
    s.sum = sum;
    s.probe = probe;
    s.max_abs = max_abs;
    return true;
}

// Split = false: rows_per_block rows per block; Split = true: `splits` blocks per row, block b
// writing slice b % splits of row b / splits (split_rows.cuh) and the last one checking the row.
template <typename T, bool InPlace, bool Split>
__device__ __forceinline__ void token_logprobs_backward(const T* logits, const int32_t* __restrict__ labels,
                                                        const float* __restrict__ lse,
                                                        const float* __restrict__ lse_residual,
                                                        const float* __restrict__ grad_logp, T* grad_logits,
                                                        int32_t* __restrict__ status, float* __restrict__ partials,
                                                        unsigned* __restrict__ arrivals, int splits, HaloTokenParams p) {
    // Per-warp partial checks of rows wider than a warp (HALO_TOKEN_THREADS / 32 warps).
    __shared__ float warp_sum[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_probe[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_max_abs[HALO_TOKEN_THREADS / 32];

    constexpr int VEC = Elem<T>::VEC;
    const int threads_per_row = Split ? HALO_TOKEN_THREADS : HALO_TOKEN_THREADS / p.rows_per_block;
    const int local_row = Split ? 0 : threadIdx.x / threads_per_row;
    const int lane = Split ? (int)threadIdx.x : threadIdx.x % threads_per_row;
    const int64_t row = Split ? (int64_t)(blockIdx.x / splits) : (int64_t)blockIdx.x * p.rows_per_block + local_row;
    const RowSlice slice = Split ? row_slice(p.vocab, splits, split_slice(splits)) : RowSlice{0, p.vocab};
    // No early exit: every thread takes part in the row reductions below (uniform control flow).
    const bool in_range = row < p.rows;

    const int32_t label = in_range ? labels[row] : p.ignore_index;
    const bool ignored = label == p.ignore_index;
    const bool bad_label = !ignored && (label < 0 || (int64_t)label >= p.vocab);
    const float row_lse = in_range ? lse[row] : 0.0f;
    const float residual = in_range && lse_residual != nullptr ? lse_residual[row] : 0.0f;
    const float g = in_range ? grad_logp[row] : 0.0f;
    const bool zero_row = ignored || bad_label;
    const bool active = in_range && !zero_row;
    const int64_t y = label;
    const RowExp rexp = row_exp(row_lse, residual);
    const float c = rexp.c;
    const float neg_gc = -(g * c);

    RowProbe s = {0.0f, 0.0f, 0.0f, Elem<T>::NEG_INF_WORD};
    if (in_range) {
        // This block's columns of the row (all of it unless split); `vocab` is their count.
        const T* in = logits + row * p.vocab + slice.begin;
        T* out = grad_logits + row * p.vocab + slice.begin;
        const int64_t vocab = slice.end - slice.begin;
        const bool same_misalignment =
            ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
        // Vectors only when input and output reach a 16-byte boundary together, in the fast form;
        // else all scalar.
        const int64_t head = same_misalignment && rexp.fast ? head_to_alignment(in, vocab) : vocab;
        const int64_t n_vecs = (vocab - head) / VEC;
        // The label's column (`col_y` in this block's columns): its writer reads z_y first (in
        // place, the loops overwrite it).
        const int64_t col_y = y - slice.begin;
        const bool label_here = !zero_row && (!Split || (col_y >= 0 && col_y < vocab));
        const bool owns_label = label_here && lane == owner_lane<T>(col_y, head, n_vecs, threads_per_row);
        const float z_y = owns_label ? Elem<T>::to_f32(in[col_y]) : 0.0f;

        #pragma unroll 1
        for (int64_t j = lane; j < head; j += threads_per_row) {
            const float z = zero_row ? 0.0f : Elem<T>::to_f32(in[j]);
            out[j] = Elem<T>::from_f32(zero_row ? 0.0f : grad_element<T>(z, prob_unscaled(z, rexp), neg_gc, s));
        }
        const uint4* in_vecs = reinterpret_cast<const uint4*>(in + head);
        uint4* out_vecs = reinterpret_cast<uint4*>(out + head);
        if (zero_row) {
            const uint4 zero = {0u, 0u, 0u, 0u};  // +0.0 in every dtype
            for (int64_t i = lane; i < n_vecs; i += threads_per_row) store16(out_vecs + i, zero);
        } else {
            // Two 16-byte loads in flight per thread before either is consumed; trips counted in 32
            // bits with one pointer each way (past 2^31 − 1 trips the one-vector loop takes the rest).
            const int64_t pair = 2 * (int64_t)threads_per_row;
            const int64_t full = n_vecs > lane + (int64_t)threads_per_row
                                     ? (n_vecs - lane - threads_per_row + pair - 1) / pair
                                     : 0;
            const int trips = full < 2147483647 ? (int)full : 2147483647;
            const uint4* src = in_vecs + lane;
            uint4* dst = out_vecs + lane;
            #pragma unroll 1
            for (int t = 0; t < trips; t++, src += pair, dst += pair) {
                const uint4 a = load_vec<T, InPlace>(src);
                const uint4 b = load_vec<T, InPlace>(src + threads_per_row);
                raise_z_max<T>(s.z_max_word, a);
                raise_z_max<T>(s.z_max_word, b);
                store16(dst, grad_vec<T>(a, neg_gc, rexp, s));
                store16(dst + threads_per_row, grad_vec<T>(b, neg_gc, rexp, s));
            }
            #pragma unroll 1
            for (int64_t i = lane + (int64_t)trips * pair; i < n_vecs; i += threads_per_row) {
                const uint4 a = load_vec<T, InPlace>(in_vecs + i);
                raise_z_max<T>(s.z_max_word, a);
                store16(out_vecs + i, grad_vec<T>(a, neg_gc, rexp, s));
            }
        }
        #pragma unroll 1
        for (int64_t j = head + n_vecs * VEC + lane; j < vocab; j += threads_per_row) {
            const float z = zero_row ? 0.0f : Elem<T>::to_f32(in[j]);
            out[j] = Elem<T>::from_f32(zero_row ? 0.0f : grad_element<T>(z, prob_unscaled(z, rexp), neg_gc, s));
        }
        if (Elem<T>::NARROW) {
            // The vector loop's max |w| from its largest z: |w| = |neg_gc|·ex2(z·log2e − lse_l2)
            // is non-decreasing in z (FFMA and rounding are monotone, and so is MUFU.EX2), so the
            // same computation on the max gives the max, bit for bit. (NaN z: the probe reports it.)
            const float z_max = Elem<T>::word_max(s.z_max_word);
            if (z_max > -INFINITY) s.max_abs = fmaxf(s.max_abs, fabsf(neg_gc * prob_fast(z_max, rexp)));
        }
        if (owns_label) {
            // g·(1 − p_y) = g − g·c·e_y, over the −g·p_y this thread wrote (Σ already holds e_y).
            const float w_y = fmaf(neg_gc, prob_unscaled(z_y, rexp), g);
            out[col_y] = Elem<T>::from_f32(w_y);
            if (Elem<T>::NARROW) s.max_abs = fmaxf(s.max_abs, fabsf(w_y));
        }
    }

    // A split row that is not counted is reported by its first slice's block alone.
    if (Split && !active && split_slice(splits) != 0) return;

    // The row's checks: sub-warp butterfly, then (rows wider than a warp) the row's warps in order.
    const int width = threads_per_row < 32 ? threads_per_row : 32;
    s.sum = group_sum(s.sum, width);
    s.probe = group_max_nan(s.probe, width);
    if (Elem<T>::NARROW) s.max_abs = group_max(s.max_abs, width);
    if (threads_per_row > 32) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) {
            warp_sum[warp] = s.sum;
            warp_probe[warp] = s.probe;
            warp_max_abs[warp] = s.max_abs;
        }
        __syncthreads();
        const int warps_per_row = threads_per_row >> 5;
        const int first = local_row * warps_per_row;
        s.sum = warp_sum[first];
        s.probe = warp_probe[first];
        s.max_abs = warp_max_abs[first];
        for (int w = 1; w < warps_per_row; w++) {
            s.sum += warp_sum[first + w];
            s.probe = halo_max_abs_nan(s.probe, warp_probe[first + w]);
            s.max_abs = fmaxf(s.max_abs, warp_max_abs[first + w]);
        }
    }

    if (Split && active && !merge_backward_slices(s, row, splits, partials, arrivals)) return;
    if (!in_range || lane != 0) return;
    if (bad_label) atomicMin(&status[HALO_STATUS_BAD_LABEL], (int32_t)row);
    if (!active) return;
    // As the CPU op: ignored rows are not read, so only counted rows must hold finite values.
    if (!isfinite(row_lse) || !isfinite(residual)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)row);
    if (!isfinite(g)) atomicMin(&status[HALO_STATUS_NONFINITE_GRAD], (int32_t)row);
    const float prob_sum = c * s.sum;
    // Overflow: f16/bf16 probe the values written; f32's are all bounded by |g|·max(1, Σp).
    const bool overflow = Elem<T>::NARROW ? s.max_abs >= Elem<T>::overflow_threshold()
                                          : isinf(fabsf(g) * fmaxf(prob_sum, 1.0f));
    if (!(s.probe < INFINITY)) {
        atomicMin(&status[HALO_STATUS_BWD_NONFINITE_LOGITS], (int32_t)row);
    } else if (!lse_fits_row(row_lse, prob_sum)) {
        atomicMin(&status[HALO_STATUS_BWD_INCONSISTENT_LSE], (int32_t)row);
    } else if (overflow) {
        atomicMin(&status[HALO_STATUS_BWD_OVERFLOW], (int32_t)row);
    }
}

// sm_90: __launch_bounds__(…, 5), five 256-thread blocks per SM, i.e. at most 48 registers (the
// forward's budget); left free, ptxas took up to 63 for the in-place f16/bf16 forms (four blocks).
// sm_80: ptxas takes up to 80 unbounded and spills under the 48-register bound; four blocks (64) there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define HALO_TOKEN_BACKWARD_MIN_BLOCKS 4
#else
#define HALO_TOKEN_BACKWARD_MIN_BLOCKS 5
#endif
// The split forms (small batches: about two blocks per SM, split_rows.cuh) need no high occupancy;
// at 48 registers their slice bookkeeping spilled one register: four blocks (64) per SM.
#define HALO_TOKEN_BACKWARD_SPLIT_MIN_BLOCKS 3
#define HALO_TOKEN_BACKWARD(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS, HALO_TOKEN_BACKWARD_MIN_BLOCKS)            \
        token_logprobs_backward_##SUFFIX(                                                                         \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,         \
        const float* __restrict__ lse_residual, const float* __restrict__ grad_logp, T* __restrict__ grad_logits, \
        int32_t* __restrict__ status, HaloTokenParams p) {                                                        \
        token_logprobs_backward<T, false, false>(logits, labels, lse, lse_residual, grad_logp, grad_logits,      \
                                                 status, nullptr, nullptr, 1, p);                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS, HALO_TOKEN_BACKWARD_MIN_BLOCKS)            \
        token_logprobs_backward_inplace_##SUFFIX(                                                                 \
        T* logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,                            \
        const float* __restrict__ lse_residual, const float* __restrict__ grad_logp, int32_t* __restrict__ status, \
        HaloTokenParams p) {                                                                                      \
        token_logprobs_backward<T, true, false>(logits, labels, lse, lse_residual, grad_logp, logits, status,    \
                                                nullptr, nullptr, 1, p);                                          \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS, HALO_TOKEN_BACKWARD_SPLIT_MIN_BLOCKS)      \
        token_logprobs_backward_split_##SUFFIX(                                                                   \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,         \
        const float* __restrict__ lse_residual, const float* __restrict__ grad_logp, T* __restrict__ grad_logits, \
        int32_t* __restrict__ status, float* __restrict__ partials, unsigned* __restrict__ arrivals,             \
        int32_t splits, HaloTokenParams p) {                                                                      \
        token_logprobs_backward<T, false, true>(logits, labels, lse, lse_residual, grad_logp, grad_logits,       \
                                                status, partials, arrivals, splits, p);                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS, HALO_TOKEN_BACKWARD_SPLIT_MIN_BLOCKS)      \
        token_logprobs_backward_inplace_split_##SUFFIX(                                                           \
        T* logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,                            \
        const float* __restrict__ lse_residual, const float* __restrict__ grad_logp, int32_t* __restrict__ status, \
        float* __restrict__ partials, unsigned* __restrict__ arrivals, int32_t splits, HaloTokenParams p) {      \
        token_logprobs_backward<T, true, true>(logits, labels, lse, lse_residual, grad_logp, logits, status,     \
                                               partials, arrivals, splits, p);                                    \
    }

HALO_TOKEN_BACKWARD(f32, float)
HALO_TOKEN_BACKWARD(bf16, __nv_bfloat16)
HALO_TOKEN_BACKWARD(f16, __half)
