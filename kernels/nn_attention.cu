// nn_attention.cu — fused causal multi-head self-attention of the GPT-2 model (forward and backward),
// over the `c_attn` output `qkv: [batch·seq, 3·C]` whose rows are `[q | k | v]`, each split into
// `n_head` heads of `hd = C / n_head` columns. CPU twin and definition:
// halo-train/src/autograd/cpu/attention.rs. A simple kernel for short contexts (seq ≤ 1024, hd ≤ 128):
//   forward              one block per (sequence, head, query row i): S_ij = q_i·k_j·scale for j ≤ i, a
//                        stable softmax (max first), P's row written in full (0 above the diagonal),
//                        o_i = Σ_j P_ij v_j.
//   backward_query       one block per (sequence, head, query row i): dP_ij = do_i·v_j,
//                        dS_ij = P_ij (dP_ij − Σ_j dP_ij P_ij) into the scratch `dscores` (only j ≤ i
//                        written), dq_i += scale · Σ_j dS_ij k_j.
//   backward_key         one block per (sequence, head, key row j), after backward_query:
//                        dk_j += scale · Σ_{i ≥ j} dS_ij q_i, dv_j += Σ_{i ≥ j} P_ij do_i.
// Every block owns its output row, so the gradients accumulate with plain `+=` (no atomics), and every
// sum runs in a fixed order: a rerun gives the same bits.
#include "halo_common.cuh"
#include "reductions.cuh"

#define HALO_ATTN_THREADS 128
#define HALO_ATTN_MAX_SEQ 1024
#define HALO_ATTN_MAX_HEAD_DIM HALO_ATTN_THREADS

// The (sequence, head, row) of this block; the grid is batch · n_head · seq blocks, row fastest. The
// host bounds the grid by 2^31 blocks, seq by HALO_ATTN_MAX_SEQ and hd by HALO_ATTN_MAX_HEAD_DIM: the
// index math is 32-bit (int64 division is a slow subroutine), element offsets are 64-bit.
struct AttnRow {
    int64_t bh;        // sequence · n_head + head: the index of this (sequence, head)'s P matrix
    int row;           // the query (or key) row inside the sequence
    int hd;            // head size
    int64_t head_col;  // the head's first column inside q, k, v and out: head · hd
    int64_t token0;    // the sequence's first token (row of qkv / out)
    const float* q;    // column 0 of this head's q in token 0 of the sequence (row stride 3·dim)
    const float* k;
    const float* v;
};

__device__ __forceinline__ AttnRow attn_row(const float* __restrict__ qkv, int seq, int n_head, int64_t dim) {
    AttnRow r;
    const unsigned block = blockIdx.x;
    r.row = (int)(block % (unsigned)seq);
    const unsigned bh = block / (unsigned)seq;
    r.bh = bh;
    r.hd = (int)(dim / n_head);
    const int64_t b = bh / (unsigned)n_head, h = bh % (unsigned)n_head;
    r.head_col = h * r.hd;
    r.token0 = b * seq;
    r.q = qkv + r.token0 * 3 * dim + r.head_col;
    r.k = r.q + dim;
    r.v = r.q + 2 * dim;
    return r;
}

// Max over the block (every thread gets it), warp by warp in a fixed order. `scratch`: __shared__ [32].
__device__ __forceinline__ float attn_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(HALO_FULL_MASK, v, offset));
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < HALO_ATTN_THREADS / 32; w++) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

// x · y over `hd` elements, in index order (x in shared memory, read by every thread alike).
__device__ __forceinline__ float attn_dot(const float* x, const float* __restrict__ y, int hd) {
    float s = 0.0f;
    for (int d = 0; d < hd; d++) s = fmaf(x[d], y[d], s);
    return s;
}

// Σ_j w(j) · rows[j·stride + d] for column d of every row j of `0 ..= last` (j ≡ g mod groups), for
// the thread's (g, d), then summed over the groups in order; thread d < hd returns column d's total.
// `w(j)` reads shared memory written before the call's first barrier. Threads: (g, d) = (t / hd, t % hd),
// groups = THREADS / hd (hd ≤ THREADS); the threads beyond groups · hd only join the barrier.
template <typename W>
__device__ __forceinline__ float attn_weighted_rows(W w, const float* __restrict__ rows, int64_t stride,
                                                    int last, int hd, float* part) {
    const int t = threadIdx.x;
    const int groups = HALO_ATTN_THREADS / hd;
    const int g = t / hd, d = t % hd;
    if (g < groups) {
        float acc = 0.0f;
        for (int j = g; j <= last; j += groups) acc = fmaf(w(j), rows[j * stride + d], acc);
        part[t] = acc;
    }
    __syncthreads();
    float total = 0.0f;
    if (t < hd)
        for (int k = 0; k < groups; k++) total += part[k * hd + t];
    return total;
}

#define HALO_ATTN_KERNEL extern "C" __global__ void __launch_bounds__(HALO_ATTN_THREADS)

HALO_ATTN_KERNEL attention_forward_f32(const float* __restrict__ qkv, float* __restrict__ out,
                                       float* __restrict__ probs, int32_t seq, int32_t n_head, int64_t dim,
                                       float scale) {
    __shared__ float q_s[HALO_ATTN_MAX_HEAD_DIM];
    __shared__ float p_s[HALO_ATTN_MAX_SEQ];
    __shared__ float part_s[HALO_ATTN_THREADS];
    __shared__ float red_s[32];
    const AttnRow r = attn_row(qkv, seq, n_head, dim);
    const int64_t stride = 3 * dim;
    const int i = r.row;
    const int t = threadIdx.x;
    for (int d = t; d < r.hd; d += HALO_ATTN_THREADS) q_s[d] = r.q[i * stride + d];
    __syncthreads();
    // Scores: one key per thread (the key's row is read by one thread, from L1 after the first touch).
    float local_max = -INFINITY;
    for (int j = t; j <= i; j += HALO_ATTN_THREADS) {
        const float s = attn_dot(q_s, r.k + j * stride, r.hd) * scale;
        p_s[j] = s;
        local_max = fmaxf(local_max, s);
    }
    // Stable softmax: exponents relative to the row's max are ≤ 0, so nothing overflows.
    const float m = attn_block_max(local_max, red_s);
    float local_sum = 0.0f;
    for (int j = t; j <= i; j += HALO_ATTN_THREADS) {
        const float e = expf(p_s[j] - m);
        p_s[j] = e;
        local_sum += e;
    }
    const float inv = 1.0f / block_sum(local_sum, red_s);
    float* prow = probs + (r.bh * seq + i) * seq;
    for (int j = t; j < seq; j += HALO_ATTN_THREADS) prow[j] = j <= i ? p_s[j] * inv : 0.0f;
    const float o = attn_weighted_rows([&](int j) { return p_s[j] * inv; }, r.v, stride, i, r.hd, part_s);
    if (t < r.hd) out[(r.token0 + i) * dim + r.head_col + t] = o;
}

HALO_ATTN_KERNEL attention_backward_query_f32(const float* __restrict__ qkv, const float* __restrict__ probs,
                                              const float* __restrict__ dout, float* __restrict__ dqkv,
                                              float* __restrict__ dscores, int32_t seq, int32_t n_head,
                                              int64_t dim, float scale) {
    __shared__ float do_s[HALO_ATTN_MAX_HEAD_DIM];
    __shared__ float ds_s[HALO_ATTN_MAX_SEQ];
    __shared__ float part_s[HALO_ATTN_THREADS];
    __shared__ float red_s[32];
    const AttnRow r = attn_row(qkv, seq, n_head, dim);
    const int64_t stride = 3 * dim;
    const int i = r.row;
    const int64_t head_col = r.head_col;
    const int t = threadIdx.x;
    for (int d = t; d < r.hd; d += HALO_ATTN_THREADS) do_s[d] = dout[(r.token0 + i) * dim + head_col + d];
    __syncthreads();
    const float* prow = probs + (r.bh * seq + i) * seq;
    float local_dot = 0.0f;
    for (int j = t; j <= i; j += HALO_ATTN_THREADS) {
        const float dp = attn_dot(do_s, r.v + j * stride, r.hd);
        ds_s[j] = dp;
        local_dot = fmaf(dp, prow[j], local_dot);
    }
    // Softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)); entries above the diagonal are never read.
    const float dot = block_sum(local_dot, red_s);
    float* dsrow = dscores + (r.bh * seq + i) * seq;
    for (int j = t; j <= i; j += HALO_ATTN_THREADS) {
        const float ds = prow[j] * (ds_s[j] - dot);
        ds_s[j] = ds;
        dsrow[j] = ds;
    }
    __syncthreads();
    const float dq = attn_weighted_rows([&](int j) { return ds_s[j]; }, r.k, stride, i, r.hd, part_s);
    if (t < r.hd) dqkv[(r.token0 + i) * stride + head_col + t] += scale * dq;
}

HALO_ATTN_KERNEL attention_backward_key_f32(const float* __restrict__ qkv, const float* __restrict__ probs,
                                            const float* __restrict__ dout, const float* __restrict__ dscores,
                                            float* __restrict__ dqkv, int32_t seq, int32_t n_head, int64_t dim,
                                            float scale) {
    __shared__ float part_k[HALO_ATTN_THREADS];
    __shared__ float part_v[HALO_ATTN_THREADS];
    const AttnRow r = attn_row(qkv, seq, n_head, dim);
    const int64_t stride = 3 * dim;
    const int j = r.row;
    const int64_t head_col = r.head_col;
    const int t = threadIdx.x;
    const int groups = HALO_ATTN_THREADS / r.hd;
    const int g = t / r.hd, d = t % r.hd;
    // Column j of P and dS over the queries i ≥ j that see key j; thread (g, d) takes i ≡ j + g.
    const float* pcol = probs + r.bh * seq * seq + j;
    const float* dscol = dscores + r.bh * seq * seq + j;
    const float* do_col = dout + r.token0 * dim + head_col + d;
    if (g < groups) {
        float acc_k = 0.0f, acc_v = 0.0f;
        for (int i = j + g; i < seq; i += groups) {
            acc_k = fmaf(dscol[(int64_t)i * seq], r.q[i * stride + d], acc_k);
            acc_v = fmaf(pcol[(int64_t)i * seq], do_col[i * dim], acc_v);
        }
        part_k[t] = acc_k;
        part_v[t] = acc_v;
    }
    __syncthreads();
    if (t < r.hd) {
        float dk = 0.0f, dv = 0.0f;
        for (int k = 0; k < groups; k++) {
            dk += part_k[k * r.hd + t];
            dv += part_v[k * r.hd + t];
        }
        float* drow = dqkv + (r.token0 + j) * stride + head_col + t;
        drow[dim] += scale * dk;
        drow[2 * dim] += dv;
    }
}
