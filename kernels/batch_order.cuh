// batch_order.cuh — a stable ascending sort of per-pair keys inside one block, as the CPU's
// `ascending_order` (src/losses/dpo.rs) orders them: f64 total order (`f64::total_cmp`: −0 before
// +0), ties by index. Used by the AOT losses, which pair the k-th smallest of two batch-wide keys.
//
// Each key is ranked by counting the keys before it (O(n²/threads) comparisons, the keys staged
// through shared memory a tile at a time), and its index is scattered to `order[rank]`. Because
// "before" is a strict total order whatever the values (NaN included), the ranks are a permutation
// of 0..n: every slot of `order` is written exactly once, so the caller may read any of them.
#pragma once
#include "halo_common.cuh"

// Whether key `a` (index ia) sorts before key `b` (index ib).
__device__ __forceinline__ bool sorts_before(double a, int ia, double b, int ib) {
    if (a < b) return true;
    if (a > b) return false;
    // Equal, or a NaN among them (non-finite inputs, which the host reports): NaN last, then −0
    // before +0 (equal as values), then the index.
    const bool nan_a = isnan(a), nan_b = isnan(b);
    if (nan_a != nan_b) return nan_b;
    const bool neg_a = signbit(a), neg_b = signbit(b);
    if (neg_a != neg_b) return neg_a;
    return ia < ib;
}

// Sorts two keys of each of the `n` items at once: `first_key(j)` into `first_order[0..n)` and
// `second_key(j)` into `second_order[0..n)` (index of the k-th smallest at slot k). Every thread of
// the block must call it (it synchronizes); it returns after a barrier, with `order` complete and
// visible to the whole block. `blockDim.x <= TILE`.
template <int TILE, typename FirstKey, typename SecondKey>
__device__ __forceinline__ void block_stable_order2(int n, FirstKey first_key, SecondKey second_key,
                                                    uint32_t* __restrict__ first_order,
                                                    uint32_t* __restrict__ second_order) {
    __shared__ double first_tile[TILE], second_tile[TILE];
    const int threads = blockDim.x;
    for (int base = 0; base < n; base += threads) {
        const int i = base + threadIdx.x;
        const bool mine = i < n;
        const double first = mine ? first_key(i) : 0.0, second = mine ? second_key(i) : 0.0;
        int first_rank = 0, second_rank = 0;
        for (int tile = 0; tile < n; tile += threads) {
            const int j = tile + threadIdx.x;
            if (j < n) {
                first_tile[threadIdx.x] = first_key(j);
                second_tile[threadIdx.x] = second_key(j);
            }
            __syncthreads();
            const int len = n - tile < threads ? n - tile : threads;
            if (mine) {
                for (int t = 0; t < len; t++) {
                    first_rank += sorts_before(first_tile[t], tile + t, first, i);
                    second_rank += sorts_before(second_tile[t], tile + t, second, i);
                }
            }
            __syncthreads();
        }
        if (mine) {
            first_order[first_rank] = (uint32_t)i;
            second_order[second_rank] = (uint32_t)i;
        }
    }
    // Global writes of the block are visible to all its threads after the barrier.
    __syncthreads();
}
