/* halo_abi.h — the plain-C structs and constants shared by the kernels (the .cu files of this folder), the CUDA
 * backend (`src/cuda`) and the host emulation (`src/emulation`). Mirrored field for field by the
 * `#[repr(C)]` structs in `src/kernel_abi.rs`; `tests/emulated_abi.rs` checks sizes and offsets.
 *
 * Rules: fixed-width fields only, explicit padding, every struct a multiple of 8 bytes, passed to
 * kernels BY VALUE as the last argument. See kernels/README.md for every entry point. */
#ifndef HALO_ABI_H
#define HALO_ABI_H

#include <stdint.h>

/* ---- launch geometry ------------------------------------------------------------------------ */

/* Threads per block of every token-level kernel (forward, backward, backward in place). */
#define HALO_TOKEN_THREADS 256
/* Threads per block of the sequence kernels (one block per sequence). */
#define HALO_SEQ_THREADS 256
/* Threads of the single block of the loss kernels (KTO, DPO). */
#define HALO_LOSS_THREADS 256

/* ---- status buffer ------------------------------------------------------------------------- */

/* Every token kernel takes `int32_t* status` of HALO_STATUS_LEN entries, which the caller fills with
 * HALO_STATUS_OK (= INT32_MAX) before the launch. A kernel lowers an entry to the smallest offending
 * row with atomicMin, so after the launch each entry is either HALO_STATUS_OK or the FIRST bad row
 * (deterministic whatever the block order). Rows must fit in int32 (rows < 2^31 - 1). */
#define HALO_STATUS_LEN 8
#define HALO_STATUS_OK 2147483647
/* A label neither ignore_index nor in 0..vocab (forward and backward). */
#define HALO_STATUS_BAD_LABEL 0
/* Forward: a non-ignored row with a NaN / +-inf logit, or finite logits whose log-prob overflows f32. Backward: a non-finite lse (non-ignored row). */
#define HALO_STATUS_NONFINITE 1
/* Backward: a non-finite grad_logp (non-ignored row). DPO kernel: first pair with a zero count (IPO). */
#define HALO_STATUS_NONFINITE_GRAD 2
#define HALO_STATUS_EMPTY_SEQUENCE 2
/* Unused, reserved (kept HALO_STATUS_OK). */
#define HALO_STATUS_RESERVED 3
/* Backward, found while a counted row is written (each row reports only the first of the three, in
 * this order; the host reports the smallest row over the three slots, ties in this order): */
/* a NaN / +-inf logit; */
#define HALO_STATUS_BWD_NONFINITE_LOGITS 4
/* an lse that is not the row's logsumexp: |sum_v exp(z_v - lse - residual) - 1| > HALO_LSE_SUM_TOL + |lse| * 2^-23; */
#define HALO_STATUS_BWD_INCONSISTENT_LSE 5
/* a gradient the storage dtype cannot hold (f16/bf16: a value that rounds to +-inf; f32: |g| * max(1, sum p) overflows). */
#define HALO_STATUS_BWD_OVERFLOW 6

/* Absolute part of the backward's tolerance on sum_v p_v = 1 (Rust: cpu::LSE_SUM_TOLERANCE). */
#define HALO_LSE_SUM_TOL 1e-3f

/* ---- token-level ops ------------------------------------------------------------------------ */

/* Shape of a `[rows, vocab]` logits matrix and how rows map to blocks.
 * rows_per_block: a power of two in 1..=HALO_TOKEN_THREADS; each row gets
 * HALO_TOKEN_THREADS / rows_per_block consecutive threads. Launch grid.x = ceil(rows / rows_per_block).
 * Use `halo_token_rows_per_block(vocab)` (below; `kernel_abi::token_rows_per_block` in Rust). */
typedef struct HaloTokenParams {
    int64_t rows;
    int64_t vocab;
    int32_t ignore_index;
    int32_t rows_per_block;
} HaloTokenParams;

/* ---- sequence ops ------------------------------------------------------------------------- */

/* batch: number of sequences (grid.x = batch). seq: rows per sequence for the padded layout (ignored
 * by the packed entry points, which read cu_seqlens[batch + 1]). use_clamp != 0 enables the humanline
 * clamp of each token's log-ratio to [clamp_min, clamp_max] (log-ratio kernels only). */
typedef struct HaloSeqParams {
    int64_t batch;
    int64_t seq;
    int32_t ignore_index;
    int32_t use_clamp;
    float clamp_min;
    float clamp_max;
} HaloSeqParams;

/* Humanline backward mask over n tokens: token_grad[t] = 0 where policy[t] - reference[t] lies outside
 * [clamp_min, clamp_max] (the clamp was active there). Launch grid.x = ceil(n / HALO_SEQ_THREADS). */
typedef struct HaloClampParams {
    int64_t n;
    float clamp_min;
    float clamp_max;
} HaloClampParams;

/* ---- KTO ----------------------------------------------------------------------------------- */

#define HALO_KTO_LOSS_KTO 0
#define HALO_KTO_LOSS_APO_ZERO_UNPAIRED 1

/* kl_mode: where the reference point z0 = max(0, mean KL log-ratio) comes from.
 *   HALO_KL_FROM_PAIRS: the kernel reduces kl_policy[i] - kl_reference[i] over i < kl_count.
 *   HALO_KL_FROM_SUM:   z0 = max(0, kl_sum / kl_total) (an all-reduced sum and count).
 *   HALO_KL_ZERO:       z0 = 0 (apo_zero_unpaired, or KTO without KL, as TRL's calculate_KL=False). */
#define HALO_KL_FROM_PAIRS 0
#define HALO_KL_FROM_SUM 1
#define HALO_KL_ZERO 2

typedef struct HaloKtoParams {
    int32_t batch;
    int32_t kl_count;
    int32_t loss_type;
    int32_t kl_mode;
    float beta;
    float desirable_weight;
    float undesirable_weight;
    float kl_sum;
    float kl_total;
    int32_t _pad;
} HaloKtoParams;

/* Slots of the KTO `out[HALO_KTO_OUT_LEN]` (f32). Rewards are beta * (logp_policy - logp_ref). */
#define HALO_KTO_OUT_LOSS 0 /* mean over the batch of the weighted losses */
#define HALO_KTO_OUT_Z0 1 /* the reference point actually used */
#define HALO_KTO_OUT_KL_SUM 2 /* local sum of KL log-ratios (HALO_KL_FROM_PAIRS) else kl_sum */
#define HALO_KTO_OUT_KL_COUNT 3 /* kl_count (pairs) or kl_total */
#define HALO_KTO_OUT_CHOSEN_REWARD_SUM 4
#define HALO_KTO_OUT_REJECTED_REWARD_SUM 5
#define HALO_KTO_OUT_CHOSEN_COUNT 6
#define HALO_KTO_OUT_REJECTED_COUNT 7
#define HALO_KTO_OUT_CHOSEN_LOGP_SUM 8
#define HALO_KTO_OUT_REJECTED_LOGP_SUM 9
#define HALO_KTO_OUT_LEN 12

/* ---- DPO family ----------------------------------------------------------------------------- */

#define HALO_DPO_LOSS_SIGMOID 0
#define HALO_DPO_LOSS_ROBUST 1
#define HALO_DPO_LOSS_HINGE 2
#define HALO_DPO_LOSS_IPO 3
#define HALO_DPO_LOSS_APO_ZERO 4
#define HALO_DPO_LOSS_APO_DOWN 5
#define HALO_DPO_LOSS_EXO_PAIR 6
#define HALO_DPO_LOSS_NCA_PAIR 7
#define HALO_DPO_LOSS_BCO_PAIR 8
#define HALO_DPO_LOSS_SPPO_HARD 9
#define HALO_DPO_LOSS_AOT 10
#define HALO_DPO_LOSS_AOT_UNPAIRED 11
#define HALO_DPO_LOSS_DISCOPOP 12
#define HALO_DPO_LOSS_SFT 13
#define HALO_DPO_LOSS_SIGMOID_NORM 14

/* label_smoothing: epsilon of sigmoid, robust, exo_pair, aot, aot_unpaired (else 0).
 * discopop_tau: DiscoPOP's temperature (discopop only, else 0). */
/* f_divergence: one of HALO_DPO_F_* (f-DPO's score of a log-ratio); f_alpha: alpha of
 * HALO_DPO_F_ALPHA (else 0). The host sends reverse KL for |alpha - 1| < 1e-6. */
#define HALO_DPO_F_REVERSE_KL 0
#define HALO_DPO_F_FORWARD_KL 1
#define HALO_DPO_F_JS_DIVERGENCE 2
#define HALO_DPO_F_ALPHA 3
typedef struct HaloDpoParams {
    int32_t pairs;
    int32_t loss_type;
    float beta;
    float label_smoothing;
    float discopop_tau;
    int32_t f_divergence;
    float f_alpha;
    int32_t _pad;
} HaloDpoParams;

/* Slots of the DPO `out[HALO_DPO_OUT_LEN]` (f32). */
#define HALO_DPO_OUT_LOSS 0 /* mean over pairs */
#define HALO_DPO_OUT_CHOSEN_REWARD_SUM 1 /* sum of beta * (pc - rc) */
#define HALO_DPO_OUT_REJECTED_REWARD_SUM 2 /* sum of beta * (pr - rr) */
#define HALO_DPO_OUT_ACCURACY_COUNT 3 /* pairs with chosen reward > rejected reward */
#define HALO_DPO_OUT_MARGIN_SUM 4 /* sum of chosen - rejected reward */
#define HALO_DPO_OUT_CHOSEN_LOGP_SUM 5
#define HALO_DPO_OUT_REJECTED_LOGP_SUM 6
#define HALO_DPO_OUT_LEN 8

/* ---- host helpers ------------------------------------------------------------------------- */

/* Threads per row: the smallest power of two >= vocab / 32 (about 32 elements per thread),
 * clamped to [4, HALO_TOKEN_THREADS]; rows_per_block = HALO_TOKEN_THREADS / threads_per_row. */
static inline int32_t halo_token_rows_per_block(int64_t vocab) {
    int64_t tpr = 4;
    while (tpr < HALO_TOKEN_THREADS && tpr * 32 < vocab) tpr *= 2;
    return (int32_t)(HALO_TOKEN_THREADS / tpr);
}

#endif /* HALO_ABI_H */
