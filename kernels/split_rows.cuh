// split_rows.cuh — several blocks per row for batches too small to fill the device (8 rows on 132
// SMs would leave 124 idle). Block b of a split launch (grid rows · splits) takes slice
// k = b % splits of row b / splits: columns [⌊k·vocab/splits⌋, ⌊(k+1)·vocab/splits⌋) (the host's
// `cuda::row_slice`). Each block publishes its slice's partial (four floats) to a scratch buffer,
// counts its arrival on the row's counter (zeroed by the host before the launch), and the block that
// arrives last merges the row's partials in slice order — no float atomics, so the result has the
// same bits whichever block comes last (the "last block" pattern of CUDA's threadFenceReduction).
#pragma once
#include "halo_common.cuh"

// Most slices per row: the merging block reads one partial per thread (Rust: cuda::MAX_ROW_SPLITS).
#define HALO_MAX_ROW_SPLITS HALO_TOKEN_THREADS
static_assert(HALO_MAX_ROW_SPLITS <= HALO_TOKEN_THREADS, "the merge reads one partial per thread");
// Floats per partial (three used; four keep a partial in one 16-byte line).
#define HALO_SPLIT_PARTIAL_FLOATS 4

struct RowSlice {
    int64_t begin;
    int64_t end;
};

// This block's slice of its row.
__device__ __forceinline__ int split_slice(int splits) { return (int)(blockIdx.x % (unsigned)splits); }

// Columns of slice k of a row of `vocab` (the host checked that splits · vocab fits in int64).
__device__ __forceinline__ RowSlice row_slice(int64_t vocab, int splits, int k) {
    RowSlice r;
    r.begin = (int64_t)k * vocab / splits;
    r.end = (int64_t)(k + 1) * vocab / splits;
    return r;
}

// Thread 0 publishes the block's partial (a, b, c) of slice `slice` of `row` and counts its
// arrival; returns, in every thread of the block (block-uniform, after a barrier), whether this
// block arrived last — then every partial of the row is visible to it.
__device__ __forceinline__ bool split_publish_and_arrive(float* __restrict__ partials, unsigned* __restrict__ arrivals,
                                                         int64_t row, int splits, int slice, float a, float b, float c) {
    __shared__ int arrived_last;
    if (threadIdx.x == 0) {
        float* mine = partials + (row * splits + slice) * HALO_SPLIT_PARTIAL_FLOATS;
        mine[0] = a;
        mine[1] = b;
        mine[2] = c;
        __threadfence();  // the partial reaches the whole device before the arrival is counted
        const unsigned before = atomicAdd(&arrivals[row], 1u);
        arrived_last = before == (unsigned)(splits - 1);
        if (arrived_last) __threadfence();  // and the others' partials are read after their arrivals
    }
    __syncthreads();
    return arrived_last != 0;
}

// In the last block: the row's partials into shared arrays (thread k reads slice k, bypassing the
// non-coherent L1 by volatile loads), then a barrier.
__device__ __forceinline__ void split_gather(const float* partials, int64_t row, int splits, float* a, float* b,
                                             float* c) {
    const int k = threadIdx.x;
    if (k < splits) {
        const volatile float* src = partials + (row * splits + k) * HALO_SPLIT_PARTIAL_FLOATS;
        a[k] = src[0];
        b[k] = src[1];
        c[k] = src[2];
    }
    __syncthreads();
}
