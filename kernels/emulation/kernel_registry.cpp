// kernel_registry.cpp — every kernel of kernels/*.cu compiled for the host (HALO_HOST_EMULATION) and
// registered by name for the emulated driver's cuModuleGetFunction / cuLaunchKernel, plus the ABI
// layout query (tests/emulated_abi.rs) and the emulation's self-tests (tests/emulated_runtime.rs).
//
// A launch unpacks cuLaunchKernel's `kernelParams` (one pointer per argument) by the kernel's own C++
// signature: `run_kernel<decltype(&k)>` reads argument i as the i-th parameter type of `k`, so no
// kernel needs glue of its own. Adding a kernel = including its .cu and one HALO_KERNEL line.
#include <stddef.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "../token_logprobs.cu"
#include "../token_logprobs_backward.cu"
#include "../sequence_sums.cu"
#include "../kto_loss.cu"
#include "../dpo_loss.cu"
#include "../naive_baseline.cu"
#include "../fused_head_tiles.cu"
#include "../nn_adamw.cu"
#include "../nn_grad_norm.cu"
#include "../nn_attention.cu"
#include "../nn_layernorm.cu"
#include "../nn_gelu.cu"
#include "../nn_elementwise.cu"
#include "../nn_embedding.cu"

#include "emulated_driver.h"

// ---- fault-injection kernels for the memory checker's own tests (tests/emulated_memcheck.rs) -----
// Not in any PTX: a test loads them with a module naming them. Each does one access on thread 0.
extern "C" __global__ void halo_selftest_write_at(float* p, int64_t index, float value) {
    if (threadIdx.x == 0 && blockIdx.x == 0) p[index] = value;
}
extern "C" __global__ void halo_selftest_read_at(const float* p, int64_t index, float* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = p[index];
}
extern "C" __global__ void halo_selftest_vector_load_at(const float* p, int64_t byte_offset, float* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(p) + byte_offset));
        out[0] = __uint_as_float(v.x);
    }
}

namespace halo_driver {
namespace {

template <typename... Args, size_t... I>
std::tuple<Args...> unpack(void** params, std::index_sequence<I...>) {
    // Each argument is copied out of the caller's storage (which need only outlive the call).
    return std::tuple<Args...>{*static_cast<const std::remove_cv_t<Args>*>(params[I])...};
}

template <typename F>
struct Signature;

template <typename... Args>
struct Signature<void (*)(Args...)> {
    static std::vector<size_t> sizes() { return {sizeof(Args)...}; }

    static void run(void (*kernel)(Args...), const LaunchShape& shape, void** params) {
        std::tuple<Args...> args = unpack<Args...>(params, std::index_sequence_for<Args...>{});
        ::halo_emu::run_grid(shape.grid_x, shape.block_x, shape.dynamic_shared_bytes,
                             [&] { std::apply(kernel, args); });
    }
};

#define HALO_KERNEL(name)                                                                          \
    KernelEntry{#name, &Signature<decltype(&name)>::sizes,                                         \
                [](const LaunchShape& shape, void** params) { Signature<decltype(&name)>::run(&name, shape, params); }}

#define HALO_TOKEN_KERNELS(SUFFIX)                                                                 \
    HALO_KERNEL(token_logprobs_forward_##SUFFIX), HALO_KERNEL(token_logprobs_backward_##SUFFIX),  \
        HALO_KERNEL(token_logprobs_backward_inplace_##SUFFIX), HALO_KERNEL(naive_log_softmax_##SUFFIX), \
        HALO_KERNEL(naive_gather_##SUFFIX), HALO_KERNEL(token_logprobs_forward_split_##SUFFIX),          \
        HALO_KERNEL(token_logprobs_backward_split_##SUFFIX),                                             \
        HALO_KERNEL(token_logprobs_backward_inplace_split_##SUFFIX)

}  // namespace

const std::vector<KernelEntry>& all_kernels() {
    static const std::vector<KernelEntry> kernels = {
        HALO_TOKEN_KERNELS(f32),
        HALO_TOKEN_KERNELS(bf16),
        HALO_TOKEN_KERNELS(f16),
        HALO_KERNEL(sequence_sums_padded_f32),
        HALO_KERNEL(sequence_sums_packed_f32),
        HALO_KERNEL(sequence_logratio_sums_padded_f32),
        HALO_KERNEL(sequence_logratio_sums_packed_f32),
        HALO_KERNEL(broadcast_sequence_grad_padded_f32),
        HALO_KERNEL(broadcast_sequence_grad_packed_f32),
        HALO_KERNEL(humanline_grad_mask_f32),
        HALO_KERNEL(kto_loss_f32),
        HALO_KERNEL(dpo_loss_f32),
        HALO_KERNEL(fused_head_tile_forward),
        HALO_KERNEL(fused_head_state_reset),
        HALO_KERNEL(fused_head_finalize),
        HALO_KERNEL(fused_head_tile_backward),
        HALO_KERNEL(fused_head_bias_grad),
        HALO_KERNEL(fused_head_gather_f32),
        HALO_KERNEL(fused_head_gather_bf16),
        HALO_KERNEL(fused_head_gather_f16),
        HALO_KERNEL(fused_head_gather_wide_bf16),
        HALO_KERNEL(fused_head_gather_wide_f16),
        HALO_KERNEL(fused_head_widen_bf16),
        HALO_KERNEL(fused_head_widen_f16),
        HALO_KERNEL(fused_head_scatter_rows),
        HALO_KERNEL(fused_head_first_nonfinite),
        HALO_KERNEL(nn_adamw_step_f32),
        HALO_KERNEL(nn_adamw_step_clipped_f32),
        HALO_KERNEL(nn_adamw_step_clipped_write_back_f32),
        HALO_KERNEL(nn_grad_sum_squares_f32),
        HALO_KERNEL(nn_grad_norm_finish_f32),
        HALO_KERNEL(attention_forward_f32),
        HALO_KERNEL(attention_backward_query_f32),
        HALO_KERNEL(attention_backward_key_f32),
        HALO_KERNEL(nn_layernorm_forward),
        HALO_KERNEL(nn_layernorm_backward_dx),
        HALO_KERNEL(nn_ln_param_partials),
        HALO_KERNEL(nn_gelu_forward),
        HALO_KERNEL(nn_gelu_backward),
        HALO_KERNEL(nn_accumulate),
        HALO_KERNEL(nn_accumulate_scaled),
        HALO_KERNEL(nn_accumulate_broadcast),
        HALO_KERNEL(nn_accumulate_product),
        HALO_KERNEL(nn_add),
        HALO_KERNEL(nn_scale),
        HALO_KERNEL(nn_multiply),
        HALO_KERNEL(nn_add_bias_forward),
        HALO_KERNEL(nn_column_sum_partials),
        HALO_KERNEL(nn_column_sums_finish),
        HALO_KERNEL(nn_sum_partials),
        HALO_KERNEL(nn_sum_finish),
        HALO_KERNEL(nn_embedding_forward),
        HALO_KERNEL(nn_embedding_backward),
        HALO_KERNEL(halo_selftest_write_at),
        HALO_KERNEL(halo_selftest_read_at),
        HALO_KERNEL(halo_selftest_vector_load_at),
    };
    return kernels;
}

const KernelEntry* find_kernel(const std::string& name) {
    for (const KernelEntry& k : all_kernels())
        if (name == k.name) return &k;
    return nullptr;
}

void lock_launches() { ::halo_emu::machine().launch_mutex.lock(); }
void unlock_launches() { ::halo_emu::machine().launch_mutex.unlock(); }

}  // namespace halo_driver

// The names of every registered kernel, one per line (the emulated backend's module when the build
// had no nvcc to produce PTX). Returns the length written (without NUL), or the length needed.
extern "C" size_t halo_emu_kernel_names(char* buf, size_t len) {
    std::string names;
    for (const halo_driver::KernelEntry& k : halo_driver::all_kernels()) {
        names += k.name;
        names += '\n';
    }
    if (buf != nullptr && len > names.size()) memcpy(buf, names.c_str(), names.size() + 1);
    return names.size();
}

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
    Q_FIELD(HaloDpoParams, discopop_tau)
    Q_FIELD(HaloDpoParams, f_divergence)
    Q_FIELD(HaloDpoParams, f_alpha)
    Q_FIELD(HaloDpoParams, _pad)
    Q_CONST(HALO_TOKEN_THREADS)
    Q_CONST(HALO_SEQ_THREADS)
    Q_CONST(HALO_LOSS_THREADS)
    Q_CONST(HALO_STATUS_LEN)
    Q_CONST(HALO_STATUS_OK)
    Q_CONST(HALO_STATUS_BAD_LABEL)
    Q_CONST(HALO_STATUS_NONFINITE)
    Q_CONST(HALO_STATUS_NONFINITE_GRAD)
    Q_CONST(HALO_STATUS_EMPTY_SEQUENCE)
    Q_CONST(HALO_STATUS_BWD_NONFINITE_LOGITS)
    Q_CONST(HALO_STATUS_BWD_INCONSISTENT_LSE)
    Q_CONST(HALO_STATUS_BWD_OVERFLOW)
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
    Q_CONST(HALO_DPO_LOSS_APO_DOWN)
    Q_CONST(HALO_DPO_LOSS_EXO_PAIR)
    Q_CONST(HALO_DPO_LOSS_NCA_PAIR)
    Q_CONST(HALO_DPO_LOSS_BCO_PAIR)
    Q_CONST(HALO_DPO_LOSS_SPPO_HARD)
    Q_CONST(HALO_DPO_LOSS_AOT)
    Q_CONST(HALO_DPO_LOSS_AOT_UNPAIRED)
    Q_CONST(HALO_DPO_LOSS_DISCOPOP)
    Q_CONST(HALO_DPO_LOSS_SFT)
    Q_CONST(HALO_DPO_LOSS_SIGMOID_NORM)
    Q_CONST(HALO_DPO_F_REVERSE_KL)
    Q_CONST(HALO_DPO_F_FORWARD_KL)
    Q_CONST(HALO_DPO_F_JS_DIVERGENCE)
    Q_CONST(HALO_DPO_F_ALPHA)
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
extern "C" void halo_emu_warp_selftest(uint32_t grid_x, uint32_t block_x, int* out) {
    ::halo_emu::launch(grid_x, block_x, [&] { warp_selftest(out); });
}
