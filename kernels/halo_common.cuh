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

// 2^x with flush-to-zero (PTX ex2.approx.ftz.f32): one MUFU.EX2, without exp2f's three-instruction
// guard for denormal results. The hot loops' probabilities are relative to the row's max or lse, so
// a result below 2^-126 is a probability below 1.2e-38: 0 within every tolerance.
__device__ __forceinline__ float halo_ex2_ftz(float x) {
#ifdef HALO_HOST_EMULATION
    return halo_ex2_approx_ftz(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// max(a, |x|), NaN once either is NaN (PTX max.NaN.f32, one FMNMX.NAN with an |x| operand): the
// hot loops' NaN/±inf probe. A running value that is not < inf saw a NaN or an infinity.
__device__ __forceinline__ float halo_max_abs_nan(float a, float x) {
#ifdef HALO_HOST_EMULATION
    return halo_max_nan_f32(a, fabsf(x));
#else
    float y;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(fabsf(x)));
    return y;
#endif
}

// Largest |row constant| c for the one-FFMA exponent 2^(x·log2e − round(c·log2e)): the rounding
// error err of round(c·log2e) is at most half an ulp of c·log2e, and every term carries a factor
// 2^err (taken out exactly afterwards). Below 2^24, |c·log2e| < 2^25 and err ≤ 1: the terms stay
// within a factor 2 of exp(x − c). (At 2^127 err reaches 1e31 and the terms overflow to inf: the
// fuzzer found that.) Rows beyond take the exact two-step form. A power of two, for a cheap compare.
#define HALO_EX2_FMA_LIMIT 16777216.0f /* 2^24 */

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
    static constexpr unsigned NEG_INF_WORD = 0xff800000u;
    __device__ __forceinline__ static void unpack_word(unsigned w, float* out) { out[0] = __uint_as_float(w); }
    __device__ __forceinline__ static unsigned pack_word(const float* in) { return __float_as_uint(in[0]); }
    // The larger value of two words (NaN loses to a number).
    __device__ __forceinline__ static unsigned max_word(unsigned a, unsigned b) {
        return __float_as_uint(fmaxf(__uint_as_float(a), __uint_as_float(b)));
    }
    __device__ __forceinline__ static float word_max(unsigned w) { return __uint_as_float(w); }
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
    // Two -inf elements in one word (the identity of max_word).
    static constexpr unsigned NEG_INF_WORD = 0xff80ff80u;
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
    // Per half, the larger of two words (one HMNMX2.BF16 for two elements; NaN loses to a number).
    __device__ __forceinline__ static unsigned max_word(unsigned a, unsigned b) {
#ifdef HALO_HOST_EMULATION
        return halo_max_bf16x2(a, b);
#else
        unsigned r;
        asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
        return r;
#endif
    }
    // The larger of a word's two elements, in f32.
    __device__ __forceinline__ static float word_max(unsigned w) {
        float x[2];
        unpack_word(w, x);
        return fmaxf(x[0], x[1]);
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
    static constexpr unsigned NEG_INF_WORD = 0xfc00fc00u;
    __device__ __forceinline__ static void unpack_word(unsigned w, float* out) {
        out[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
        out[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
    }
    __device__ __forceinline__ static unsigned pack_word(const float* in) {
        unsigned lo = __half_as_ushort(__float2half_rn(in[0]));
        unsigned hi = __half_as_ushort(__float2half_rn(in[1]));
        return lo | (hi << 16);
    }
    __device__ __forceinline__ static unsigned max_word(unsigned a, unsigned b) {
#ifdef HALO_HOST_EMULATION
        return halo_max_f16x2(a, b);
#else
        unsigned r;
        asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
        return r;
#endif
    }
    __device__ __forceinline__ static float word_max(unsigned w) {
        float x[2];
        unpack_word(w, x);
        return fmaxf(x[0], x[1]);
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

// The largest element of n 16-byte vectors (NaNs ignored unless all are NaN), in f32: f16/bf16
// take the max of the packed pairs first (one instruction per two elements).
template <typename T, int N>
__device__ __forceinline__ float vecs_max(const uint4 (&v)[N]) {
    unsigned m = Elem<T>::max_word(v[0].x, v[0].y);
    m = Elem<T>::max_word(m, v[0].z);
    m = Elem<T>::max_word(m, v[0].w);
#pragma unroll
    for (int q = 1; q < N; q++) {
        // pairwise within a vector, then into the running word: a shorter dependency chain
        const unsigned a = Elem<T>::max_word(v[q].x, v[q].y);
        const unsigned b = Elem<T>::max_word(v[q].z, v[q].w);
        m = Elem<T>::max_word(m, Elem<T>::max_word(a, b));
    }
    return Elem<T>::word_max(m);
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
