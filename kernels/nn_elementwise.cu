// nn_elementwise.cu — the element-wise ops of the GPT model of halo-train: sums, scaling, the bias
// broadcast and its backward (column sums), products (dropout), and the sum of all elements.
// CPU twins and definitions: halo-train/src/autograd/cpu/elementwise.rs and, for add / scale / sum,
// the forwards of `Add`, `Scale`, `Sum` in halo-train/src/autograd/ops.rs (their backwards are
// accumulate, accumulate_scaled and accumulate_broadcast). Host side: src/cuda/nn/elementwise.rs.
//
// Flat ops grid-stride over n elements with 64-bit indices (any grid works). Row ops (bias) take one
// block per row. Column sums and the total sum reduce in a fixed order (no atomics): the same bits
// every run, whatever the grid.
#include "halo_common.cuh"
#include "reductions.cuh"

#define NN_EW_THREADS 256

#define NN_EW_FLAT_LOOP(i, n) \
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// dst += src.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_accumulate(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
    NN_EW_FLAT_LOOP(i, n) dst[i] += src[i];
}

// dst += factor · src.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_accumulate_scaled(float* __restrict__ dst, const float* __restrict__ src, float factor, int64_t n) {
    NN_EW_FLAT_LOOP(i, n) dst[i] += factor * src[i];
}

// dst += src[0] (the backward of the sum of all elements: one device scalar to every element).
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_accumulate_broadcast(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
    const float s = src[0];
    NN_EW_FLAT_LOOP(i, n) dst[i] += s;
}

// dst += a ⊙ b.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_accumulate_product(float* __restrict__ dst, const float* __restrict__ a, const float* __restrict__ b,
                          int64_t n) {
    NN_EW_FLAT_LOOP(i, n) dst[i] += a[i] * b[i];
}

// y = a + b.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_add(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, int64_t n) {
    NN_EW_FLAT_LOOP(i, n) y[i] = a[i] + b[i];
}

// y = x · factor (the tape's Scale forward multiplies in this order).
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_scale(const float* __restrict__ x, float factor, float* __restrict__ y, int64_t n) {
    NN_EW_FLAT_LOOP(i, n) y[i] = x[i] * factor;
}

// y = x ⊙ m.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_multiply(const float* __restrict__ x, const float* __restrict__ m, float* __restrict__ y, int64_t n) {
    NN_EW_FLAT_LOOP(i, n) y[i] = x[i] * m[i];
}

// y[r, c] = x[r, c] + b[c]: one block per row (grid-stride over rows), threads over the columns.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_add_bias_forward(const float* __restrict__ x, const float* __restrict__ b, int64_t rows, int64_t cols,
                        float* __restrict__ y) {
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x)
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) y[row * cols + c] = x[row * cols + c] + b[c];
}

// Column sums, first stage: partials[k, c] = Σ_{rows of chunk k, in order} dy[row, c] for chunks of
// `rows_per_chunk` consecutive rows. Blocks over (chunk, column tile) as b = k·tiles + tile, one
// thread per column (consecutive threads read consecutive columns: coalesced).
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_column_sum_partials(const float* __restrict__ dy, int64_t rows, int64_t cols, int64_t rows_per_chunk,
                           float* __restrict__ partials) {
    const int64_t tiles = (cols + blockDim.x - 1) / blockDim.x;
    const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t k = blockIdx.x / tiles;
    const int64_t c = (blockIdx.x - k * tiles) * blockDim.x + threadIdx.x;
    if (k >= chunks || c >= cols) return;
    const int64_t begin = k * rows_per_chunk;
    const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    float s = 0.0f;
    for (int64_t row = begin; row < end; row++) s += dy[row * cols + c];
    partials[k * cols + c] = s;
}

// Column sums, second stage: out[c] += Σ_k partials[k, c] for k = 0, 1, … (chunk order), one
// thread per column (grid-stride). Also finishes nn_ln_param_partials (nn_layernorm.cu).
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_column_sums_finish(const float* __restrict__ partials, int64_t chunks, int64_t cols,
                          float* __restrict__ out) {
    NN_EW_FLAT_LOOP(c, cols) {
        float s = 0.0f;
        for (int64_t k = 0; k < chunks; k++) s += partials[k * cols + c];
        out[c] += s;
    }
}

// Sum over the block in f64 (the tape's Sum accumulates in f64), warp by warp in index order.
__device__ __forceinline__ double nn_ew_block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(HALO_FULL_MASK, v, offset);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}

// Sum of all elements, first stage: block b sums elements b·per_block .. (b+1)·per_block (each
// thread a strided subset, in order; then the block in f64) into partials[b]. The split depends
// on n alone (the wrapper's choice of per_block), so the result does not depend on the device.
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_sum_partials(const float* __restrict__ x, int64_t n, int64_t per_block, double* __restrict__ partials) {
    __shared__ double scratch[32];
    const int64_t begin = int64_t(blockIdx.x) * per_block;
    const int64_t end = begin + per_block < n ? begin + per_block : n;
    double s = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += (double)x[i];
    s = nn_ew_block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// Sum of all elements, second stage (one block): out[0] = f32(Σ_b partials[b]).
extern "C" __global__ void __launch_bounds__(NN_EW_THREADS)
    nn_sum_finish(const double* __restrict__ partials, int64_t blocks, float* __restrict__ out) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[b];
    s = nn_ew_block_sum_f64(s, scratch);
    if (threadIdx.x == 0) out[0] = (float)s;
}
