// halo_common.cuh — included first by every kernel: the CUDA (or emulated) types, the ABI, and the
// per-dtype load/store helpers that turn 16-byte vectors into f32 lanes and back.
#pragma once

#ifdef HALO_HOST_EMULATION
#include "emulation/cuda_host.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "halo_abi.h"

#ifndef HALO_HOST_EMULATION
// The emulation checks 16-byte vector accesses for alignment (the device faults on a misaligned one).
#define HALO_CHECK_ALIGNED16(p) ((void)0)
// `extern __shared__` storage of the launch (dynamic shared memory), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* halo_dynamic_shared() {
    extern __shared__ uint4 halo_dynamic_shared_storage[];
    return reinterpret_cast<T*>(halo_dynamic_shared_storage);
}
#endif

#define HALO_FULL_MASK 0xffffffffu
#define HALO_LOG2E 1.4426950408889634f

// Storage traits: VEC elements per 16-byte vector, conversions with f32 (round to nearest even).
template <typename T>
struct Elem;

template <>
struct Elem<float> {
    static constexpr int VEC = 4;
    // Narrower than f32: a stored value can overflow where its f32 value did not.
    static constexpr bool NARROW = false;
    __device__ __forceinline__ static float overflow_threshold() { return INFINITY; }
    __device__ __forceinline__ static float to_f32(float x) { return x; }
    __device__ __forceinline__ static float from_f32(float x) { return x; }
    // Lanes of one 32-bit word of a vector.
    static constexpr int PER_WORD = 1;
    __device__ __forceinline__ static void unpack_word(unsigned w, float* out) { out[0] = __uint_as_float(w); }
    __device__ __forceinline__ static unsigned pack_word(const float* in) { return __float_as_uint(in[0]); }
};

template <>
struct Elem<__nv_bfloat16> {
    static constexpr int VEC = 8;
    static constexpr bool NARROW = true;
    // The smallest f32 magnitude that rounds to inf: the tie above the largest finite bf16 0x7F7F
    // (odd mantissa, so the tie rounds up). As `overflow_threshold` in src/cpu/token_logprobs_backward.rs.
    __device__ __forceinline__ static float overflow_threshold() { return __uint_as_float(0x7F7F8000u); }
    __device__ __forceinline__ static float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
    static constexpr int PER_WORD = 2;
    // bf16 is the top half of an f32: widening is a shift, exact.
    __device__ __forceinline__ static void unpack_word(unsigned w, float* out) {
        out[0] = __uint_as_float(w << 16);
        out[1] = __uint_as_float(w & 0xffff0000u);
    }
    __device__ __forceinline__ static unsigned pack_word(const float* in) {
        unsigned lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[0]));
        unsigned hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[1]));
        return lo | (hi << 16);
    }
};

template <>
struct Elem<__half> {
    static constexpr int VEC = 8;
    static constexpr bool NARROW = true;
    // 65504 (0x7BFF) has an odd mantissa: the tie 65520 rounds up to inf.
    __device__ __forceinline__ static float overflow_threshold() { return 65520.0f; }
    __device__ __forceinline__ static float to_f32(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_f32(float x) { return __float2half_rn(x); }
    static constexpr int PER_WORD = 2;
    __device__ __forceinline__ static void unpack_word(unsigned w, float* out) {
        out[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
        out[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
    }
    __device__ __forceinline__ static unsigned pack_word(const float* in) {
        unsigned lo = __half_as_ushort(__float2half_rn(in[0]));
        unsigned hi = __half_as_ushort(__float2half_rn(in[1]));
        return lo | (hi << 16);
    }
};

// 16-byte vector <-> VEC f32 lanes.
template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& v, float (&out)[Elem<T>::VEC]) {
    constexpr int P = Elem<T>::PER_WORD;
    Elem<T>::unpack_word(v.x, out + 0 * P);
    Elem<T>::unpack_word(v.y, out + 1 * P);
    Elem<T>::unpack_word(v.z, out + 2 * P);
    Elem<T>::unpack_word(v.w, out + 3 * P);
}

template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float (&in)[Elem<T>::VEC]) {
    constexpr int P = Elem<T>::PER_WORD;
    uint4 v;
    v.x = Elem<T>::pack_word(in + 0 * P);
    v.y = Elem<T>::pack_word(in + 1 * P);
    v.z = Elem<T>::pack_word(in + 2 * P);
    v.w = Elem<T>::pack_word(in + 3 * P);
    return v;
}

// Plain 16-byte vector load and store (a buffer the kernel also writes: not the read-only path).
__device__ __forceinline__ uint4 load16(const uint4* p) {
    HALO_CHECK_ALIGNED16(p);
    return *p;
}
__device__ __forceinline__ void store16(uint4* p, const uint4& v) {
    HALO_CHECK_ALIGNED16(p);
    *p = v;
}

// Elements from `p` to the next 16-byte boundary (0 if aligned), at most `n`.
template <typename T>
__device__ __forceinline__ int64_t head_to_alignment(const T* p, int64_t n) {
    const int misaligned_bytes = (int)(reinterpret_cast<uintptr_t>(p) & 15u);
    const int64_t head = misaligned_bytes == 0 ? 0 : (16 - misaligned_bytes) / (int)sizeof(T);
    return head < n ? head : n;
}
