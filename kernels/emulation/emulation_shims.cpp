// emulation_shims.cpp — the host build of every kernel (HALO_HOST_EMULATION): includes the very same
// .cu sources under cuda_host.h and exports one `halo_emu_<entry point>(grid_x, block_x, args...)`
// per kernel for src/emulation, plus the ABI layout query used by tests/emulated_abi.rs.
#include <stddef.h>
#include <string.h>

#include "../token_logprobs.cu"
#include "../token_logprobs_backward.cu"
#include "../sequence_sums.cu"
#include "../kto_loss.cu"
#include "../dpo_loss.cu"

#define HALO_EMU_TOKEN_SHIMS(SUFFIX, T)                                                                       \
    HALO_EMU_SHIM(token_logprobs_forward_##SUFFIX,                                                            \
                  (const T* logits, const int32_t* labels, float* logp, float* lse, int32_t* status,          \
                   HaloTokenParams p),                                                                        \
                  (logits, labels, logp, lse, status, p))                                                     \
    HALO_EMU_SHIM(token_logprobs_backward_##SUFFIX,                                                           \
                  (const T* logits, const int32_t* labels, const float* lse, const float* grad_logp,          \
                   T* grad_logits, int32_t* status, HaloTokenParams p),                                       \
                  (logits, labels, lse, grad_logp, grad_logits, status, p))                                   \
    HALO_EMU_SHIM(token_logprobs_backward_inplace_##SUFFIX,                                                   \
                  (T * logits, const int32_t* labels, const float* lse, const float* grad_logp,               \
                   int32_t* status, HaloTokenParams p),                                                       \
                  (logits, labels, lse, grad_logp, status, p))

HALO_EMU_TOKEN_SHIMS(f32, float)
HALO_EMU_TOKEN_SHIMS(bf16, __nv_bfloat16)
HALO_EMU_TOKEN_SHIMS(f16, __half)

HALO_EMU_SHIM(sequence_sums_padded_f32,
              (const float* values, const int32_t* labels, float* sums, uint32_t* counts, HaloSeqParams p),
              (values, labels, sums, counts, p))
HALO_EMU_SHIM(sequence_sums_packed_f32,
              (const float* values, const int32_t* labels, const uint32_t* cu_seqlens, float* sums,
               uint32_t* counts, HaloSeqParams p),
              (values, labels, cu_seqlens, sums, counts, p))
HALO_EMU_SHIM(sequence_logratio_sums_padded_f32,
              (const float* policy, const float* reference, const int32_t* labels, float* sums, uint32_t* counts,
               HaloSeqParams p),
              (policy, reference, labels, sums, counts, p))
HALO_EMU_SHIM(sequence_logratio_sums_packed_f32,
              (const float* policy, const float* reference, const int32_t* labels, const uint32_t* cu_seqlens,
               float* sums, uint32_t* counts, HaloSeqParams p),
              (policy, reference, labels, cu_seqlens, sums, counts, p))
HALO_EMU_SHIM(broadcast_sequence_grad_padded_f32,
              (const float* grad_seq, const int32_t* labels, float* token_grad, HaloSeqParams p),
              (grad_seq, labels, token_grad, p))
HALO_EMU_SHIM(broadcast_sequence_grad_packed_f32,
              (const float* grad_seq, const int32_t* labels, const uint32_t* cu_seqlens, float* token_grad,
               HaloSeqParams p),
              (grad_seq, labels, cu_seqlens, token_grad, p))
HALO_EMU_SHIM(humanline_grad_mask_f32,
              (const float* policy, const float* reference, float* token_grad, HaloClampParams p),
              (policy, reference, token_grad, p))
HALO_EMU_SHIM(kto_loss_f32,
              (const float* policy_logp, const float* reference_logp, const uint8_t* desirable,
               const float* kl_policy, const float* kl_reference, float* grad_policy, float* out, HaloKtoParams p),
              (policy_logp, reference_logp, desirable, kl_policy, kl_reference, grad_policy, out, p))
HALO_EMU_SHIM(dpo_loss_f32,
              (const float* policy_chosen, const float* policy_rejected, const float* reference_chosen,
               const float* reference_rejected, const uint32_t* chosen_counts, const uint32_t* rejected_counts,
               float* grad_chosen, float* grad_rejected, float* out, int32_t* status, HaloDpoParams p),
              (policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_counts, rejected_counts,
               grad_chosen, grad_rejected, out, status, p))

// ABI layout as the C compiler sees it: "sizeof Struct", "Struct.field" (offset) or a constant name.
// Returns -1 for an unknown name.
extern "C" int64_t halo_emu_abi_query(const char* name) {
#define Q_SIZE(S) \
    if (strcmp(name, "sizeof " #S) == 0) return (int64_t)sizeof(S);
#define Q_FIELD(S, F) \
    if (strcmp(name, #S "." #F) == 0) return (int64_t)offsetof(S, F);
#define Q_CONST(C) \
    if (strcmp(name, #C) == 0) return (int64_t)(C);
    Q_SIZE(HaloTokenParams)
    Q_FIELD(HaloTokenParams, rows)
    Q_FIELD(HaloTokenParams, vocab)
    Q_FIELD(HaloTokenParams, ignore_index)
    Q_FIELD(HaloTokenParams, rows_per_block)
    Q_SIZE(HaloSeqParams)
    Q_FIELD(HaloSeqParams, batch)
    Q_FIELD(HaloSeqParams, seq)
    Q_FIELD(HaloSeqParams, ignore_index)
    Q_FIELD(HaloSeqParams, use_clamp)
    Q_FIELD(HaloSeqParams, clamp_min)
    Q_FIELD(HaloSeqParams, clamp_max)
    Q_SIZE(HaloClampParams)
    Q_FIELD(HaloClampParams, n)
    Q_FIELD(HaloClampParams, clamp_min)
    Q_FIELD(HaloClampParams, clamp_max)
    Q_SIZE(HaloKtoParams)
    Q_FIELD(HaloKtoParams, batch)
    Q_FIELD(HaloKtoParams, kl_count)
    Q_FIELD(HaloKtoParams, loss_type)
    Q_FIELD(HaloKtoParams, kl_mode)
    Q_FIELD(HaloKtoParams, beta)
    Q_FIELD(HaloKtoParams, desirable_weight)
    Q_FIELD(HaloKtoParams, undesirable_weight)
    Q_FIELD(HaloKtoParams, kl_sum)
    Q_FIELD(HaloKtoParams, kl_total)
    Q_FIELD(HaloKtoParams, _pad)
    Q_SIZE(HaloDpoParams)
    Q_FIELD(HaloDpoParams, pairs)
    Q_FIELD(HaloDpoParams, loss_type)
    Q_FIELD(HaloDpoParams, beta)
    Q_FIELD(HaloDpoParams, label_smoothing)
    Q_CONST(HALO_TOKEN_THREADS)
    Q_CONST(HALO_SEQ_THREADS)
    Q_CONST(HALO_LOSS_THREADS)
    Q_CONST(HALO_STATUS_LEN)
    Q_CONST(HALO_STATUS_OK)
    Q_CONST(HALO_STATUS_BAD_LABEL)
    Q_CONST(HALO_STATUS_NONFINITE)
    Q_CONST(HALO_STATUS_NONFINITE_GRAD)
    Q_CONST(HALO_STATUS_EMPTY_SEQUENCE)
    Q_CONST(HALO_KTO_LOSS_KTO)
    Q_CONST(HALO_KTO_LOSS_APO_ZERO_UNPAIRED)
    Q_CONST(HALO_KL_FROM_PAIRS)
    Q_CONST(HALO_KL_FROM_SUM)
    Q_CONST(HALO_KL_ZERO)
    Q_CONST(HALO_KTO_OUT_LOSS)
    Q_CONST(HALO_KTO_OUT_Z0)
    Q_CONST(HALO_KTO_OUT_KL_SUM)
    Q_CONST(HALO_KTO_OUT_KL_COUNT)
    Q_CONST(HALO_KTO_OUT_CHOSEN_REWARD_SUM)
    Q_CONST(HALO_KTO_OUT_REJECTED_REWARD_SUM)
    Q_CONST(HALO_KTO_OUT_CHOSEN_COUNT)
    Q_CONST(HALO_KTO_OUT_REJECTED_COUNT)
    Q_CONST(HALO_KTO_OUT_CHOSEN_LOGP_SUM)
    Q_CONST(HALO_KTO_OUT_REJECTED_LOGP_SUM)
    Q_CONST(HALO_KTO_OUT_LEN)
    Q_CONST(HALO_DPO_LOSS_SIGMOID)
    Q_CONST(HALO_DPO_LOSS_ROBUST)
    Q_CONST(HALO_DPO_LOSS_HINGE)
    Q_CONST(HALO_DPO_LOSS_IPO)
    Q_CONST(HALO_DPO_LOSS_APO_ZERO)
    Q_CONST(HALO_DPO_OUT_LOSS)
    Q_CONST(HALO_DPO_OUT_CHOSEN_REWARD_SUM)
    Q_CONST(HALO_DPO_OUT_REJECTED_REWARD_SUM)
    Q_CONST(HALO_DPO_OUT_ACCURACY_COUNT)
    Q_CONST(HALO_DPO_OUT_MARGIN_SUM)
    Q_CONST(HALO_DPO_OUT_CHOSEN_LOGP_SUM)
    Q_CONST(HALO_DPO_OUT_REJECTED_LOGP_SUM)
    Q_CONST(HALO_DPO_OUT_LEN)
    return -1;
}

// rows_per_block as the C header computes it (checked against kernel_abi::token_rows_per_block).
extern "C" int32_t halo_emu_token_rows_per_block(int64_t vocab) { return halo_token_rows_per_block(vocab); }

// ---- self-tests of the emulation itself (tests/emulated_runtime.rs) -----------------------------

extern "C" uint16_t halo_emu_float2bfloat16_rn(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
extern "C" float halo_emu_bfloat162float(uint16_t x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
extern "C" uint16_t halo_emu_float2half_rn(float x) { return __half_as_ushort(__float2half_rn(x)); }
extern "C" float halo_emu_half2float(uint16_t x) { return __half2float(__ushort_as_half(x)); }

// Every warp primitive of the contract, per thread: 8 ints written to out[8 * global thread].
__global__ void warp_selftest(int* out) {
    __shared__ int block_total;
    const int lane = threadIdx.x & 31;
    const int v = (int)(threadIdx.x * 10 + blockIdx.x * 1000);
    int* o = out + 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    o[0] = __shfl_down_sync(HALO_FULL_MASK, v, 1);
    o[1] = __shfl_sync(HALO_FULL_MASK, v, 0);
    o[2] = __shfl_xor_sync(HALO_FULL_MASK, v, 3, 8);
    o[3] = (int)__ballot_sync(HALO_FULL_MASK, lane % 3 == 0);
    o[4] = __any_sync(HALO_FULL_MASK, lane == 5);
    o[5] = __all_sync(HALO_FULL_MASK, lane < 31);
    if (threadIdx.x == 0) block_total = 0;
    __syncthreads();
    atomicAdd(&block_total, 1);
    __syncthreads();
    o[6] = block_total;
    __syncwarp();
    o[7] = (int)(gridDim.x * 100000 + blockDim.x);
}
HALO_EMU_SHIM(warp_selftest, (int* out), (out))
