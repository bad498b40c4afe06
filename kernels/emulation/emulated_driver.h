// emulated_driver.h — the pieces of the emulated CUDA driver (libhalo_cuda_emulated.so) that its
// three files share: result codes, device memory (device_memory.cpp), the kernel registry
// (kernel_registry.cpp) and the last-error detail set by every failing driver call (driver_api.cpp).
//
// The library implements the subset of the CUDA driver API that cudarc 0.19 calls for this crate;
// "device memory" is host memory, and a launch runs the host-compiled kernel (kernels/*.cu under
// cuda_host.h) synchronously on the calling thread. See kernels/README.md, "Emulated device".
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace halo_driver {

// The CUresult values this library returns (cuda.h's numbering; cudarc reads them as its enum, so
// only values of that enum may ever be returned).
enum Result : int {
    SUCCESS = 0,
    ERROR_INVALID_VALUE = 1,
    ERROR_OUT_OF_MEMORY = 2,
    ERROR_NOT_INITIALIZED = 3,
    ERROR_NO_DEVICE = 100,
    ERROR_INVALID_DEVICE = 101,
    ERROR_INVALID_IMAGE = 200,
    ERROR_INVALID_CONTEXT = 201,
    ERROR_INVALID_PTX = 218,
    ERROR_INVALID_HANDLE = 400,
    ERROR_NOT_FOUND = 500,
    ERROR_NOT_READY = 600,
    ERROR_ILLEGAL_ADDRESS = 700,
    ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    ERROR_MISALIGNED_ADDRESS = 716,
    ERROR_LAUNCH_FAILED = 719,
    ERROR_NOT_SUPPORTED = 801,
    ERROR_UNKNOWN = 999,
};

// Records `detail` as this thread's last error (read by halo_emu_last_error) and returns `code`.
Result fail(Result code, const std::string& detail);

// ---- device memory (device_memory.cpp) ----------------------------------------------------------
//
// Every allocation is its own mapping: [guard page][front red zone][data][tail pad < 16][guard page].
// The data ends 16-byte aligned right before the rear guard page, so a read or write more than the
// padding past the end faults (reported as an illegal address); the red zone and the padding hold a
// canary byte that is checked after every launch and at free, so a write just past either end is
// reported too. Fresh allocations are filled with 0xFF bytes (NaN in f32, bf16 and f16; -1 in ints):
// an output a kernel forgets to write, or an input read before it was written, shows as NaN.

constexpr unsigned char POISON_BYTE = 0xff;
constexpr unsigned char CANARY_BYTE = 0xfe;

Result mem_alloc(uint64_t* out, size_t bytes, const char* call);
Result mem_free(uint64_t ptr, const char* call);
// [ptr, ptr + bytes) lies inside one live allocation.
Result check_range(uint64_t ptr, size_t bytes, const char* call, const char* what);
// Bytes allocated now, and the emulated device's capacity.
void mem_info(size_t* free_bytes, size_t* total_bytes);
size_t mem_capacity();
// Where `addr` is: "12 bytes past the end of the 400-byte allocation at 0x…", "unmapped", …
std::string describe_address(uintptr_t addr);
// Checks every live allocation's red zones; restores them and describes the first corruption found
// (empty when every canary is intact).
std::string check_red_zones();

// ---- kernels (kernel_registry.cpp) ----------------------------------------------------------------

struct LaunchShape {
    unsigned grid_x;
    unsigned block_x;
    unsigned dynamic_shared_bytes;
};

struct KernelEntry {
    const char* name;
    // Size in bytes of each parameter, from the kernel's C++ signature.
    std::vector<size_t> (*param_sizes)();
    // Unpacks `params` (cuLaunchKernel's array of pointers to each argument) by the kernel's own
    // signature and runs the grid. Called with the launch lock held.
    void (*run)(const LaunchShape& shape, void** params);
};

const KernelEntry* find_kernel(const std::string& name);
const std::vector<KernelEntry>& all_kernels();

// Serialises launches: `__shared__` is `static` under the emulation, so blocks must never overlap.
void lock_launches();
void unlock_launches();

// Kind of fault a kernel raised (cuda_host.h's halo_emu::fault, or the SIGSEGV/SIGBUS handler).
enum FaultKind : int { FAULT_NONE = 0, FAULT_SEGV = 1, FAULT_MISALIGNED = 2 };

}  // namespace halo_driver
