// nn_layernorm.cu — layer normalization over the last dimension of a row-major [rows, dim] buffer,
// forward and backward, for the GPT model of halo-train. CPU twin and definition:
// halo-train/src/autograd/cpu/layernorm.rs (`y = (x − μ)·rstd·γ + β`, biased variance,
// rstd = 1/√(σ² + ε)). Host side: src/cuda/nn/layernorm.rs.
//
// Row kernels: one block per row (grid-stride over rows when rows exceed the grid), the threads
// stride over the row's columns, block_sum reduces in a fixed order: the same bits every run.
// dγ/dβ are column sums over rows: nn_ln_param_partials writes one partial per (row chunk, column),
// nn_column_sums_finish (nn_elementwise.cu) adds the chunks' partials in chunk order. No atomics.
#include "halo_common.cuh"
#include "reductions.cuh"

// The largest block of the row kernels (the wrapper picks min(256, dim rounded up to a warp)).
#define NN_LN_MAX_THREADS 256

// y = (x − μ)·rstd·γ + β per row; saves μ and rstd (one per row) for the backward.
// Two passes over the row for the variance (Σ(x − μ)², as the CPU twin), then the write.
extern "C" __global__ void __launch_bounds__(NN_LN_MAX_THREADS)
    nn_layernorm_forward(const float* __restrict__ x, const float* __restrict__ gamma,
                         const float* __restrict__ beta, int64_t rows, int64_t dim, float eps,
                         float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
    __shared__ float scratch[32];
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * dim;
        float* yr = y + row * dim;
        float s = 0.0f;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) s += xr[c];
        const float m = block_sum(s, scratch) / (float)dim;
        float v = 0.0f;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            const float d = xr[c] - m;
            v += d * d;
        }
        const float var = block_sum(v, scratch) / (float)dim;
        // Correctly rounded sqrt and division (not rsqrtf's approximation): the CPU twin's rstd.
        const float r = 1.0f / sqrtf(var + eps);
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = (xr[c] - m) * r * gamma[c] + beta[c];
        if (threadIdx.x == 0) {
            mean[row] = m;
            rstd[row] = r;
        }
    }
}

// dx += rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)) with x̂ = (x − μ)·rstd and g = dy ⊙ γ, per row.
extern "C" __global__ void __launch_bounds__(NN_LN_MAX_THREADS)
    nn_layernorm_backward_dx(const float* __restrict__ x, const float* __restrict__ gamma,
                             const float* __restrict__ mean, const float* __restrict__ rstd,
                             const float* __restrict__ dy, int64_t rows, int64_t dim, float* __restrict__ dx) {
    __shared__ float scratch[32];
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * dim;
        const float* dyr = dy + row * dim;
        float* dxr = dx + row * dim;
        const float m = mean[row], r = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            const float g = dyr[c] * gamma[c];
            sg += g;
            sgx += g * (xr[c] - m) * r;
        }
        const float mean_g = block_sum(sg, scratch) / (float)dim;
        const float mean_gx = block_sum(sgx, scratch) / (float)dim;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            const float xhat = (xr[c] - m) * r;
            dxr[c] += r * (dyr[c] * gamma[c] - mean_g - xhat * mean_gx);
        }
    }
}

// Per chunk k of `rows_per_chunk` consecutive rows and column c (one thread per column, blocks
// over (chunk, column tile) as b = k·tiles + tile):
//   partials[k, c]        = Σ_{rows of k, in order} dy ⊙ x̂   (dγ's share)
//   partials[chunks + k, c] = Σ_{rows of k, in order} dy      (dβ's share)
// `partials` holds 2 · chunks · dim floats; nn_column_sums_finish adds them over k.
extern "C" __global__ void __launch_bounds__(NN_LN_MAX_THREADS)
    nn_ln_param_partials(const float* __restrict__ x, const float* __restrict__ mean,
                         const float* __restrict__ rstd, const float* __restrict__ dy, int64_t rows, int64_t dim,
                         int64_t rows_per_chunk, float* __restrict__ partials) {
    const int64_t tiles = (dim + blockDim.x - 1) / blockDim.x;
    const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t k = blockIdx.x / tiles;
    const int64_t c = (blockIdx.x - k * tiles) * blockDim.x + threadIdx.x;
    if (k >= chunks || c >= dim) return;
    const int64_t begin = k * rows_per_chunk;
    const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    float sum_gamma = 0.0f, sum_beta = 0.0f;
    for (int64_t row = begin; row < end; row++) {
        const float d = dy[row * dim + c];
        // As the CPU twin: d · (x − μ) · rstd, left to right.
        sum_gamma += d * (x[row * dim + c] - mean[row]) * rstd[row];
        sum_beta += d;
    }
    partials[k * dim + c] = sum_gamma;
    partials[(chunks + k) * dim + c] = sum_beta;
}
