// cuda_host.h — runs the CUDA kernels of this folder on the CPU (HALO_HOST_EMULATION builds only).
//
// The kernels keep ONE source; this header maps every construct of the kernel source contract
// (kernels/README.md, "Emulation") to plain C++17:
//  * a grid runs block after block; the threads of a block run as cooperative fibers (ucontext) on
//    the launching OS thread, switching only at barriers. A barrier (__syncthreads, __syncwarp, every
//    warp shuffle/vote) parks the fiber until every live thread of the block (or warp) has arrived, so
//    convergent code sees exactly the device's semantics, and the run is deterministic. Fibers instead
//    of 256 OS threads: this machine has 2 cores, and a switch costs ~0.3 us instead of a futex wake.
//  * launches are serialized by one global mutex, so `__shared__` = `static` is per-block memory.
//  * __nv_bfloat16 / __half are 16-bit structs with device-exact conversions (round to nearest even,
//    canonical NaN 0x7fff as cvt.rn produces).
#pragma once
#ifndef HALO_HOST_EMULATION
#error "cuda_host.h is only for HALO_HOST_EMULATION builds"
#endif

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <cmath>
#include <functional>
#include <mutex>
#include <vector>
#include <ucontext.h>

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
// __restrict__ is a GCC keyword already.

// ---- vector types -----------------------------------------------------------------------------
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };

static constexpr int warpSize = 32;

// ---- the fiber scheduler ------------------------------------------------------------------------
namespace halo_emu {

struct Barrier {
    int arrived = 0;
    unsigned generation = 0;
};

struct Fiber {
    ucontext_t ctx;
    dim3 thread_idx;
    bool done = false;
};

struct Machine {
    std::mutex launch_mutex;  // one launch at a time: `static` shared memory is per block
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    Fiber* current = nullptr;
    int live = 0;
    std::vector<int> warp_live;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    // Per-warp shuffle exchange, double-buffered so one barrier per shuffle suffices: a lane cannot
    // write buffer k again before every lane has passed the barrier of the shuffle after it.
    std::vector<uint64_t> exchange;  // [warps][2][32]
    std::vector<unsigned> shuffle_parity;  // per thread
    std::function<void()> kernel;
    dim3 block_idx, block_dim, grid_dim;
    std::vector<uint4> dynamic_shared;
};

inline Machine& machine() {
    static Machine m;
    return m;
}

inline void yield_to_scheduler() {
    Machine& m = machine();
    swapcontext(&m.current->ctx, &m.scheduler);
}

inline unsigned linear_tid() { return machine().current->thread_idx.x; }

inline void release(Barrier& b) {
    b.arrived = 0;
    b.generation++;
}

// Parks the calling fiber until `expected()` live threads have arrived.
template <typename Expected>
inline void wait_at(Barrier& b, Expected expected) {
    unsigned gen = b.generation;
    if (++b.arrived >= expected()) {
        release(b);
        return;
    }
    while (b.generation == gen) yield_to_scheduler();
}

inline void sync_block() {
    Machine& m = machine();
    wait_at(m.block_barrier, [&] { return m.live; });
}

inline void sync_warp() {
    Machine& m = machine();
    unsigned w = linear_tid() / 32;
    wait_at(m.warp_barriers[w], [&, w] { return m.warp_live[w]; });
}

inline void fiber_main() {
    Machine& m = machine();
    m.kernel();
    Fiber* f = m.current;
    f->done = true;
    unsigned w = f->thread_idx.x / 32;
    m.live--;
    m.warp_live[w]--;
    // A thread that exits no longer counts at barriers (the device's rule since Volta).
    if (m.block_barrier.arrived > 0 && m.block_barrier.arrived >= m.live) release(m.block_barrier);
    Barrier& wb = m.warp_barriers[w];
    if (wb.arrived > 0 && wb.arrived >= m.warp_live[w]) release(wb);
    // returning resumes uc_link = the scheduler
}

// Runs block `b` to completion. Kept out of line: swapcontext returns twice, and locals of the
// function that calls it must not live across the switch in registers.
__attribute__((noinline)) inline void run_block(unsigned b, unsigned block_x, unsigned warps, size_t stack_size) {
    Machine& m = machine();
    m.block_idx = dim3{b, 1, 1};
    m.fibers.assign(block_x, Fiber{});
    m.warp_live.assign(warps, 0);
    m.warp_barriers.assign(warps, Barrier{});
    m.block_barrier = Barrier{};
    m.exchange.assign(size_t(warps) * 64, 0);
    m.shuffle_parity.assign(block_x, 0);
    m.live = int(block_x);
    for (unsigned t = 0; t < block_x; t++) {
        Fiber& f = m.fibers[t];
        f.thread_idx = dim3{t, 1, 1};
        m.warp_live[t / 32]++;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = m.stacks[t].data();
        f.ctx.uc_stack.ss_size = stack_size;
        f.ctx.uc_link = &m.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    // Round robin until every thread has finished; a parked fiber re-checks its barrier.
    while (m.live > 0) {
        for (unsigned t = 0; t < block_x; t++) {
            if (m.fibers[t].done) continue;
            m.current = &m.fibers[t];
            swapcontext(&m.scheduler, &m.fibers[t].ctx);
        }
    }
    m.current = nullptr;
}

// Raises a fault in the running kernel (implemented by the emulated driver: the launch stops and
// fails with CUDA_ERROR_MISALIGNED_ADDRESS / CUDA_ERROR_ILLEGAL_ADDRESS naming the kernel).
[[noreturn]] void fault(int kind, const void* addr);
constexpr int FAULT_MISALIGNED = 2;

// 16-byte vector accesses fault on a misaligned address on the device; so they do here.
inline void check_aligned16(const void* p) {
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) fault(FAULT_MISALIGNED, p);
}

// Runs `kernel` over a 1-D grid: blocks one after another, a block's threads as fibers. The caller
// holds the launch lock (the driver's), so `static` shared memory is per block.
inline void run_grid(unsigned grid_x, unsigned block_x, size_t dynamic_shared_bytes, std::function<void()> kernel) {
    Machine& m = machine();
    const size_t stack_size = 256 * 1024;
    if (m.stacks.size() < block_x) m.stacks.resize(block_x);
    for (unsigned t = 0; t < block_x; t++)
        if (m.stacks[t].empty()) m.stacks[t].resize(stack_size);
    unsigned warps = (block_x + 31) / 32;
    m.kernel = std::move(kernel);
    m.grid_dim = dim3{grid_x, 1, 1};
    m.block_dim = dim3{block_x, 1, 1};
    // Dynamic shared memory: uint4 elements so that it is 16-byte aligned, as on the device.
    m.dynamic_shared.assign((dynamic_shared_bytes + 15) / 16, uint4{0, 0, 0, 0});
    for (unsigned b = 0; b < grid_x; b++) run_block(b, block_x, warps, stack_size);
    m.kernel = nullptr;
}

// A grid run outside the driver (the runtime self-test): takes the same lock the driver does.
inline void launch(unsigned grid_x, unsigned block_x, std::function<void()> kernel) {
    Machine& m = machine();
    std::lock_guard<std::mutex> guard(m.launch_mutex);
    run_grid(grid_x, block_x, 0, std::move(kernel));
}

// One shuffle: publish `bits`, wait for the warp, read lane `src`'s value (own value if src < 0).
inline uint64_t exchange(uint64_t bits, int src) {
    Machine& m = machine();
    unsigned t = linear_tid();
    unsigned w = t / 32, lane = t % 32;
    unsigned parity = m.shuffle_parity[t];
    m.shuffle_parity[t] ^= 1;
    uint64_t* slot = &m.exchange[(size_t(w) * 2 + parity) * 32];
    slot[lane] = bits;
    sync_warp();
    return src < 0 ? bits : slot[src];
}

inline unsigned lane_id() { return linear_tid() % 32; }
inline unsigned warp_width() {
    Machine& m = machine();
    unsigned w = linear_tid() / 32;
    unsigned rest = m.block_dim.x - w * 32;
    return rest < 32 ? rest : 32;
}

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace halo_emu

#define threadIdx (::halo_emu::machine().current->thread_idx)
#define blockIdx (::halo_emu::machine().block_idx)
#define blockDim (::halo_emu::machine().block_dim)
#define gridDim (::halo_emu::machine().grid_dim)

inline void __syncthreads() { halo_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { halo_emu::sync_warp(); }
// Blocks run one after another on one OS thread: a fence only has to keep the compiler in order.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Shuffles: `width` splits the warp into segments as on the device; a source outside the warp's
// live lanes returns the caller's own value (the device returns an undefined value there).
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = int(halo_emu::lane_id());
    int seg = lane / width * width;
    int s = seg + (src % width);
    if (s >= int(halo_emu::warp_width())) s = -1;
    return halo_emu::from_bits<T>(halo_emu::exchange(halo_emu::to_bits(v), s));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    int lane = int(halo_emu::lane_id());
    int s = lane ^ lane_mask;
    if (s / width != lane / width || s >= int(halo_emu::warp_width())) s = -1;
    return halo_emu::from_bits<T>(halo_emu::exchange(halo_emu::to_bits(v), s));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = int(halo_emu::lane_id());
    int s = lane + int(delta);
    if (s / width != lane / width || s >= int(halo_emu::warp_width())) s = -1;
    return halo_emu::from_bits<T>(halo_emu::exchange(halo_emu::to_bits(v), s));
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned mask = 0;
    unsigned width = halo_emu::warp_width();
    // 32 reads of the same exchange round: publish once, then read every lane.
    halo_emu::Machine& m = halo_emu::machine();
    unsigned t = halo_emu::linear_tid();
    unsigned w = t / 32, lane = t % 32;
    unsigned parity = m.shuffle_parity[t];
    m.shuffle_parity[t] ^= 1;
    uint64_t* slot = &m.exchange[(size_t(w) * 2 + parity) * 32];
    slot[lane] = pred ? 1 : 0;
    halo_emu::sync_warp();
    for (unsigned l = 0; l < width; l++)
        if (slot[l]) mask |= 1u << l;
    return mask;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
    unsigned width = halo_emu::warp_width();
    unsigned full = width == 32 ? 0xffffffffu : ((1u << width) - 1);
    return __ballot_sync(m, pred) == full;
}

// ---- atomics (fibers never preempt each other; the builtins keep the meaning explicit) ---------
inline int atomicMin(int* p, int v) { int old = __atomic_load_n(p, __ATOMIC_SEQ_CST); while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return old; }
inline int atomicMax(int* p, int v) { int old = __atomic_load_n(p, __ATOMIC_SEQ_CST); while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return old; }
inline unsigned atomicMin(unsigned* p, unsigned v) { unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST); while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return old; }
inline unsigned atomicMax(unsigned* p, unsigned v) { unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST); while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return old; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline uint4 __ldg(const uint4* p) {
    halo_emu::check_aligned16(p);
    return *p;
}

// 16-byte vector load/store of halo_common.cuh (plain pointer accesses on the device).
#define HALO_CHECK_ALIGNED16(p) ::halo_emu::check_aligned16(p)

// `extern __shared__` storage of the launch (halo_common.cuh's halo_dynamic_shared).
template <typename T>
inline T* halo_dynamic_shared() {
    return reinterpret_cast<T*>(::halo_emu::machine().dynamic_shared.data());
}

// ---- math -------------------------------------------------------------------------------------
using std::isfinite;
using std::isnan;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// PTX `ex2.approx.ftz.f32` (halo_common.cuh's halo_ex2_ftz): a denormal input counts as 0 and a
// denormal result is flushed to +0; NaN stays NaN. (The device's ~2 ulp approximation is not
// emulated, as for exp2f.)
inline float halo_ex2_approx_ftz(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    const float r = exp2f(x);
    return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}
// PTX `max.bf16x2` / `max.f16x2` on the 32-bit pairs (halo_common.cuh's Elem<T>::max_word): per
// half, the larger value; a NaN loses to a number; both NaN give the canonical NaN 0x7fff.
template <typename F>
inline unsigned halo_max_x2(unsigned a, unsigned b, F to_f32) {
    unsigned out = 0;
    for (int half = 0; half < 2; half++) {
        const uint16_t ha = (uint16_t)(a >> (16 * half)), hb = (uint16_t)(b >> (16 * half));
        const float fa = to_f32(ha), fb = to_f32(hb);
        uint16_t r;
        if (isnan(fa) && isnan(fb)) r = 0x7fff;
        else if (isnan(fa)) r = hb;
        else if (isnan(fb)) r = ha;
        else if (fa == fb) r = (ha & 0x8000) ? hb : ha;  // +0 over -0
        else r = fa > fb ? ha : hb;
        out |= (unsigned)r << (16 * half);
    }
    return out;
}
// PTX `max.NaN.f32` (halo_common.cuh's halo_max_nan): NaN if either input is NaN, else the larger.
inline float halo_max_nan_f32(float a, float b) { return (isnan(a) || isnan(b)) ? NAN : fmaxf(a, b); }
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }

// ---- 16-bit floats ------------------------------------------------------------------------------
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { uint16_t x; };
struct __half2 { __half x, y; };

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(unsigned(h.x) << 16); }
// cvt.rn.bf16.f32: round to nearest even; every NaN becomes the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }

inline float __half2float(__half h) {
    unsigned sign = unsigned(h.x & 0x8000u) << 16;
    unsigned exp = (h.x >> 10) & 0x1fu;
    unsigned man = h.x & 0x3ffu;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return __uint_as_float(sign);
        // subnormal: man * 2^-24, exact in f32
        float v = float(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}
// cvt.rn.f16.f32: round to nearest even, overflow to inf, subnormals, canonical NaN 0x7fff.
inline __half __float2half_rn(float f) {
    unsigned u = __float_as_uint(f);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{0x7fff};
    if (a >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
    if (a >= 0x38800000u) {  // normal half (>= 2^-14)
        unsigned r = a - 0x38000000u;  // rebias exponent 127 -> 15
        r += 0xfffu + ((r >> 13) & 1u);
        return __half{uint16_t(sign | (r >> 13))};
    }
    if (a < 0x33000000u) return __half{sign};  // < 2^-25 rounds to 0
    // subnormal half: value = m * 2^-24 with m in 1..1023
    unsigned exp = a >> 23;
    unsigned man = (a & 0x7fffffu) | 0x800000u;
    unsigned shift = 126 - exp;  // 14 + (127 - 14 - exp) ... bring to units of 2^-24
    // value = man * 2^(exp - 150); in units of 2^-24: man * 2^(exp - 126) = man >> (126 - exp)
    unsigned q = man >> shift;
    unsigned rem = man & ((1u << shift) - 1);
    unsigned half_ulp = 1u << (shift - 1);
    if (rem > half_ulp || (rem == half_ulp && (q & 1u))) q++;
    return __half{uint16_t(sign | q)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline unsigned halo_max_bf16x2(unsigned a, unsigned b) {
    return halo_max_x2(a, b, [](uint16_t h) { return __uint_as_float((unsigned)h << 16); });
}
inline unsigned halo_max_f16x2(unsigned a, unsigned b) {
    return halo_max_x2(a, b, [](uint16_t h) { __half x; x.x = h; return __half2float(x); });
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
