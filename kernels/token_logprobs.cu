// token_logprobs.cu — forward of the per-token log-prob gather:
//   lse[r] + lse_residual[r] = logsumexp(z[r, :]) (lse rounded to f32, residual its rounding error),  logp[r] = min((z[r, y_r] − max_r) − ln Σ_v exp(z[r, v] − max_r), 0)   (0, 0 where y_r is ignored).
// CPU twin and definition: src/cpu/token_logprobs.rs.
//
// One pass over each row: every thread keeps an online (max, Σexp) state over 16-byte vector loads
// (4 f32 or 8 bf16/f16 per load, four loads in flight per iteration), then the row's threads merge
// their states with a butterfly (and, for rows wider than a warp, through shared memory in a fixed
// order). Rows whose label is ignored are never read. Launch geometry: kernels/README.md.
#include "halo_common.cuh"
#include "online_lse.cuh"
#include "reductions.cuh"

template <typename T>
__device__ __forceinline__ void scan_scalar(OnlineLse& s, const T* p) {
    float x[1] = {Elem<T>::to_f32(p[0])};
    online_lse_add<1>(s, x);
}

template <typename T>
__device__ __forceinline__ void scan_vector(OnlineLse& s, const uint4& v) {
    float x[Elem<T>::VEC];
    unpack_vec<T>(v, x);
    online_lse_add<Elem<T>::VEC>(s, x);
}

// This thread's share of one row: elements lane, lane + stride, ... in three parts — a scalar head up
// to the first 16-byte boundary (odd vocab makes row starts unaligned), aligned vectors, a scalar tail.
template <typename T>
__device__ __forceinline__ OnlineLse scan_row(const T* __restrict__ row, int64_t vocab, int lane, int stride) {
    constexpr int VEC = Elem<T>::VEC;
    OnlineLse s = online_lse_empty();
    const int64_t head = head_to_alignment(row, vocab);
    for (int64_t j = lane; j < head; j += stride) scan_scalar<T>(s, row + j);  // head may exceed stride
    const uint4* vecs = reinterpret_cast<const uint4*>(row + head);
    const int64_t n_vecs = (vocab - head) / VEC;
    int64_t i = lane;
    for (; i + 3 * (int64_t)stride < n_vecs; i += 4 * (int64_t)stride) {
        const uint4 a = __ldg(vecs + i);
        const uint4 b = __ldg(vecs + i + stride);
        const uint4 c = __ldg(vecs + i + 2 * stride);
        const uint4 d = __ldg(vecs + i + 3 * stride);
        scan_vector<T>(s, a);
        scan_vector<T>(s, b);
        scan_vector<T>(s, c);
        scan_vector<T>(s, d);
    }
    for (; i < n_vecs; i += stride) scan_vector<T>(s, __ldg(vecs + i));
    for (int64_t j = head + n_vecs * VEC + lane; j < vocab; j += stride) scan_scalar<T>(s, row + j);
    return s;
}

template <typename T>
__device__ __forceinline__ void token_logprobs_forward(const T* __restrict__ logits, const int32_t* __restrict__ labels,
                                                       float* __restrict__ logp, float* __restrict__ lse,
                                                       float* __restrict__ lse_residual, int32_t* __restrict__ status,
                                                       HaloTokenParams p) {
    // Per-warp partial states of rows wider than a warp (HALO_TOKEN_THREADS / 32 warps).
    __shared__ float warp_max[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_sum_exp[HALO_TOKEN_THREADS / 32];
    __shared__ float warp_probe[HALO_TOKEN_THREADS / 32];

    const int threads_per_row = HALO_TOKEN_THREADS / p.rows_per_block;
    const int local_row = threadIdx.x / threads_per_row;
    const int lane = threadIdx.x % threads_per_row;
    const int64_t row = (int64_t)blockIdx.x * p.rows_per_block + local_row;
    const bool in_range = row < p.rows;
    const int32_t label = in_range ? labels[row] : p.ignore_index;
    const bool ignored = label == p.ignore_index;
    const bool bad_label = !ignored && (label < 0 || (int64_t)label >= p.vocab);
    const bool active = in_range && !ignored && !bad_label;

    // The label's logit is loaded before the scan so its latency hides behind it.
    float z_label = 0.0f;
    if (active && lane == 0) z_label = Elem<T>::to_f32(logits[row * p.vocab + label]);
    OnlineLse s = online_lse_empty();
    if (active) s = scan_row(logits + row * p.vocab, p.vocab, lane, threads_per_row);

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

    if (!in_range || lane != 0) return;
    if (bad_label) atomicMin(&status[HALO_STATUS_BAD_LABEL], (int32_t)row);
    if (!active) {
        logp[row] = 0.0f;
        lse[row] = 0.0f;
        lse_residual[row] = 0.0f;
        return;
    }
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

#define HALO_TOKEN_FORWARD(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS) token_logprobs_forward_##SUFFIX(            \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, float* __restrict__ logp,              \
        float* __restrict__ lse, float* __restrict__ lse_residual, int32_t* __restrict__ status,                 \
        HaloTokenParams p) {                                                                                      \
        token_logprobs_forward<T>(logits, labels, logp, lse, lse_residual, status, p);                           \
    }

HALO_TOKEN_FORWARD(f32, float)
HALO_TOKEN_FORWARD(bf16, __nv_bfloat16)
HALO_TOKEN_FORWARD(f16, __half)
