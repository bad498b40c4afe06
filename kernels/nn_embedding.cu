// nn_embedding.cu — embedding lookup (row ids[r] of a [table_rows, dim] table) and its backward, a
// scatter-add without atomics. CPU twin and definition: halo-train/src/autograd/cpu/embedding.rs.
// Host side: src/cuda/nn/embedding.rs, which validates every id on the host (`CudaTokenIds`) and
// uploads, besides the ids, the positions grouped by id (CSR): group u holds id unique_ids[u] at
// positions positions[offsets[u] .. offsets[u+1]], ascending.
#include "halo_common.cuh"

#define NN_EMB_THREADS 256

// y[r, :] = table[ids[r], :]: one block per position (grid-stride), threads over dim.
extern "C" __global__ void __launch_bounds__(NN_EMB_THREADS)
    nn_embedding_forward(const float* __restrict__ table, const uint32_t* __restrict__ ids, int64_t n, int64_t dim,
                         float* __restrict__ y) {
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const float* src = table + int64_t(ids[r]) * dim;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) y[r * dim + c] = src[c];
    }
}

// dtable[id, :] += dy[p, :] for each position p of id, in ascending p: one block per distinct id
// (grid-stride over the groups), threads over dim. Each element of dtable is owned by one thread
// and adds its positions in the CPU twin's order, so the result is the CPU's, bit for bit.
extern "C" __global__ void __launch_bounds__(NN_EMB_THREADS)
    nn_embedding_backward(const float* __restrict__ dy, const uint32_t* __restrict__ unique_ids,
                          const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ positions,
                          int64_t groups, int64_t dim, float* __restrict__ dtable) {
    for (int64_t u = blockIdx.x; u < groups; u += gridDim.x) {
        float* dst = dtable + int64_t(unique_ids[u]) * dim;
        const int64_t begin = offsets[u], end = offsets[u + 1];
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = dst[c];
            for (int64_t k = begin; k < end; k++) acc += dy[int64_t(positions[k]) * dim + c];
            dst[c] = acc;
        }
    }
}
