// sequence_sums.cu — per-sequence masked sums of per-token values and token counts, for the padded
// ([batch, seq]) and packed (cu_seqlens) layouts; the per-token log-ratio variant with the optional
// humanline clamp; the backward broadcast of a per-sequence gradient to the tokens; and the
// humanline backward mask (zero where the clamp was active).
// CPU twin and definition: src/cpu/sequence_sums.rs. One block per sequence; each thread sums a
// strided subset in index order, then a fixed-order block reduction: bitwise identical run to run.
#include "halo_common.cuh"
#include "reductions.cuh"

// Row range of this block's sequence.
template <bool Packed>
__device__ __forceinline__ void sequence_range(const uint32_t* __restrict__ cu_seqlens, const HaloSeqParams& p,
                                               int64_t& begin, int64_t& end) {
    const int64_t b = blockIdx.x;
    if (Packed) {
        begin = cu_seqlens[b];
        end = cu_seqlens[b + 1];
    } else {
        begin = b * p.seq;
        end = begin + p.seq;
    }
}

// Ratio == false: value = a[t]. Ratio == true: value = a[t] − b[t], clamped when p.use_clamp.
template <bool Packed, bool Ratio>
__device__ __forceinline__ void sequence_sums(const float* __restrict__ a, const float* __restrict__ b,
                                              const int32_t* __restrict__ labels,
                                              const uint32_t* __restrict__ cu_seqlens, float* __restrict__ sums,
                                              uint32_t* __restrict__ counts, HaloSeqParams p) {
    __shared__ float float_scratch[32];
    __shared__ unsigned count_scratch[32];
    int64_t begin, end;
    sequence_range<Packed>(cu_seqlens, p, begin, end);
    float sum = 0.0f;
    unsigned count = 0;
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) {
        if (labels[t] == p.ignore_index) continue;
        float v = a[t];
        if (Ratio) {
            v -= b[t];
            if (p.use_clamp) v = fminf(fmaxf(v, p.clamp_min), p.clamp_max);
        }
        sum += v;
        count++;
    }
    sum = block_sum(sum, float_scratch);
    count = block_sum_u32(count, count_scratch);
    if (threadIdx.x == 0) {
        sums[blockIdx.x] = sum;
        counts[blockIdx.x] = count;
    }
}

template <bool Packed>
__device__ __forceinline__ void broadcast_sequence_grad(const float* __restrict__ grad_seq,
                                                        const int32_t* __restrict__ labels,
                                                        const uint32_t* __restrict__ cu_seqlens,
                                                        float* __restrict__ token_grad, HaloSeqParams p) {
    int64_t begin, end;
    sequence_range<Packed>(cu_seqlens, p, begin, end);
    const float g = grad_seq[blockIdx.x];
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x)
        token_grad[t] = labels[t] == p.ignore_index ? 0.0f : g;
}

#define HALO_SEQ_KERNEL extern "C" __global__ void __launch_bounds__(HALO_SEQ_THREADS)

HALO_SEQ_KERNEL sequence_sums_padded_f32(const float* __restrict__ values, const int32_t* __restrict__ labels,
                                         float* __restrict__ sums, uint32_t* __restrict__ counts, HaloSeqParams p) {
    sequence_sums<false, false>(values, values, labels, nullptr, sums, counts, p);
}

HALO_SEQ_KERNEL sequence_sums_packed_f32(const float* __restrict__ values, const int32_t* __restrict__ labels,
                                         const uint32_t* __restrict__ cu_seqlens, float* __restrict__ sums,
                                         uint32_t* __restrict__ counts, HaloSeqParams p) {
    sequence_sums<true, false>(values, values, labels, cu_seqlens, sums, counts, p);
}

HALO_SEQ_KERNEL sequence_logratio_sums_padded_f32(const float* __restrict__ policy_logp,
                                                  const float* __restrict__ reference_logp,
                                                  const int32_t* __restrict__ labels, float* __restrict__ sums,
                                                  uint32_t* __restrict__ counts, HaloSeqParams p) {
    sequence_sums<false, true>(policy_logp, reference_logp, labels, nullptr, sums, counts, p);
}

HALO_SEQ_KERNEL sequence_logratio_sums_packed_f32(const float* __restrict__ policy_logp,
                                                  const float* __restrict__ reference_logp,
                                                  const int32_t* __restrict__ labels,
                                                  const uint32_t* __restrict__ cu_seqlens, float* __restrict__ sums,
                                                  uint32_t* __restrict__ counts, HaloSeqParams p) {
    sequence_sums<true, true>(policy_logp, reference_logp, labels, cu_seqlens, sums, counts, p);
}

HALO_SEQ_KERNEL broadcast_sequence_grad_padded_f32(const float* __restrict__ grad_seq,
                                                   const int32_t* __restrict__ labels, float* __restrict__ token_grad,
                                                   HaloSeqParams p) {
    broadcast_sequence_grad<false>(grad_seq, labels, nullptr, token_grad, p);
}

HALO_SEQ_KERNEL broadcast_sequence_grad_packed_f32(const float* __restrict__ grad_seq,
                                                   const int32_t* __restrict__ labels,
                                                   const uint32_t* __restrict__ cu_seqlens,
                                                   float* __restrict__ token_grad, HaloSeqParams p) {
    broadcast_sequence_grad<true>(grad_seq, labels, cu_seqlens, token_grad, p);
}

// Backward through the humanline clamp: the clamped log-ratio does not depend on the policy where the
// clamp was active (ratio outside [min, max]), so the token gradient is zeroed there. Same test as
// the CPU's `humanline_grad_mask` (strict comparisons: a ratio exactly at a bound keeps its gradient).
extern "C" __global__ void __launch_bounds__(HALO_SEQ_THREADS)
    humanline_grad_mask_f32(const float* __restrict__ policy_logp, const float* __restrict__ reference_logp,
                            float* __restrict__ token_grad, HaloClampParams p) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= p.n) return;
    const float ratio = policy_logp[t] - reference_logp[t];
    if (ratio < p.clamp_min || ratio > p.clamp_max) token_grad[t] = 0.0f;
}
