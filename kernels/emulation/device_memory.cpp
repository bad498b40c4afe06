// device_memory.cpp — the emulated device's memory: one mapping per allocation with a rear guard page,
// canary red zones and poisoned contents (layout and purpose in emulated_driver.h).
#include "emulated_driver.h"

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>

namespace halo_driver {
namespace {

constexpr size_t ALIGN = 16;         // what the kernels need of a pointer (16-byte vector loads)
constexpr size_t FRONT_RED_ZONE = 64;  // at least this many canary bytes before the data

struct Allocation {
    char* map;        // start of the mapping (front guard page)
    size_t map_len;   // whole mapping, guard pages included
    char* red_zone;   // first canary byte before the data
    char* data;       // what the caller gets (16-byte aligned)
    size_t size;      // bytes asked for
    size_t body;      // size rounded up to ALIGN: data + body is the rear guard page
};

struct Memory {
    std::mutex mutex;
    std::map<uintptr_t, Allocation> live;  // by data address
    size_t allocated = 0;
};

Memory& memory() {
    static Memory m;
    return m;
}

size_t page_size() {
    static const size_t page = size_t(sysconf(_SC_PAGESIZE));
    return page;
}

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

std::string hex(uintptr_t a) {
    char buf[32];
    snprintf(buf, sizeof buf, "%#llx", (unsigned long long)a);
    return buf;
}

// The allocation whose mapping contains `addr`, if any (caller holds the mutex).
const Allocation* owner_of(Memory& m, uintptr_t addr) {
    auto it = m.live.upper_bound(addr + page_size() * 2 + FRONT_RED_ZONE);
    while (it != m.live.begin()) {
        --it;
        const Allocation& a = it->second;
        const uintptr_t lo = uintptr_t(a.map), hi = lo + a.map_len;
        if (addr >= lo && addr < hi) return &a;
        if (hi <= addr) break;
    }
    return nullptr;
}

std::string describe(const Allocation& a, uintptr_t addr) {
    const uintptr_t data = uintptr_t(a.data);
    const std::string what = "the " + std::to_string(a.size) + "-byte allocation at " + hex(data);
    if (addr < data) return std::to_string(data - addr) + " bytes before the start of " + what;
    if (addr >= data + a.size) return std::to_string(addr - (data + a.size)) + " bytes past the end of " + what;
    return "byte " + std::to_string(addr - data) + " of " + what;
}

// First byte of [p, p + n) that is not the canary, or nullptr.
const char* first_corrupt(const char* p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] != CANARY_BYTE) return p + i;
    return nullptr;
}

// First overwritten canary byte in `a`'s front red zone or tail padding, or nullptr.
const char* first_corrupt_red_zone(const Allocation& a) {
    const char* bad = first_corrupt(a.red_zone, size_t(a.data - a.red_zone));
    return bad ? bad : first_corrupt(a.data + a.size, a.body - a.size);
}

}  // namespace

size_t mem_capacity() {
    // Three quarters of the machine's memory: an emulated buffer is real host memory.
    static const size_t capacity = size_t(sysconf(_SC_PHYS_PAGES)) / 4 * 3 * page_size();
    return capacity;
}

Result mem_alloc(uint64_t* out, size_t bytes, const char* call) {
    if (out == nullptr) return fail(ERROR_INVALID_VALUE, std::string(call) + ": null result pointer");
    if (bytes == 0) return fail(ERROR_INVALID_VALUE, std::string(call) + ": 0-byte allocation");
    Memory& m = memory();
    const size_t page = page_size();
    if (bytes > mem_capacity()) {
        return fail(ERROR_OUT_OF_MEMORY, std::string(call) + ": " + std::to_string(bytes) +
                                             " bytes requested, the emulated device has " +
                                             std::to_string(mem_capacity()));
    }
    const size_t body = round_up(bytes, ALIGN);
    const size_t middle = round_up(body + FRONT_RED_ZONE, page);
    const size_t map_len = middle + 2 * page;
    {
        std::lock_guard<std::mutex> lock(m.mutex);
        if (m.allocated + bytes > mem_capacity()) {
            return fail(ERROR_OUT_OF_MEMORY, std::string(call) + ": " + std::to_string(bytes) + " bytes requested, " +
                                                 std::to_string(mem_capacity() - m.allocated) + " free");
        }
        m.allocated += bytes;
    }
    void* map = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED || mprotect(static_cast<char*>(map) + page, middle, PROT_READ | PROT_WRITE) != 0) {
        if (map != MAP_FAILED) munmap(map, map_len);
        std::lock_guard<std::mutex> lock(m.mutex);
        m.allocated -= bytes;
        return fail(ERROR_OUT_OF_MEMORY, std::string(call) + ": mmap of " + std::to_string(map_len) + " bytes failed");
    }
    Allocation a;
    a.map = static_cast<char*>(map);
    a.map_len = map_len;
    a.red_zone = a.map + page;
    a.data = a.map + page + middle - body;
    a.size = bytes;
    a.body = body;
    memset(a.red_zone, CANARY_BYTE, size_t(a.data - a.red_zone));
    memset(a.data, POISON_BYTE, bytes);
    memset(a.data + bytes, CANARY_BYTE, body - bytes);
    {
        std::lock_guard<std::mutex> lock(m.mutex);
        m.live[uintptr_t(a.data)] = a;
    }
    *out = uint64_t(uintptr_t(a.data));
    return SUCCESS;
}

Result mem_free(uint64_t ptr, const char* call) {
    Memory& m = memory();
    Allocation a;
    {
        std::lock_guard<std::mutex> lock(m.mutex);
        auto it = m.live.find(uintptr_t(ptr));
        if (it == m.live.end()) {
            return fail(ERROR_INVALID_VALUE,
                        std::string(call) + ": " + hex(uintptr_t(ptr)) + " is not the start of a live allocation");
        }
        a = it->second;
        m.live.erase(it);
        m.allocated -= a.size;
    }
    // A host-side overrun cannot happen (every copy is range checked) and kernels are checked after
    // each launch, so the red zones are intact here; checking once more costs little.
    const char* bad = first_corrupt_red_zone(a);
    std::string where = bad ? describe(a, uintptr_t(bad)) : "";
    munmap(a.map, a.map_len);
    if (bad) return fail(ERROR_ILLEGAL_ADDRESS, std::string(call) + ": red zone overwritten, " + where);
    return SUCCESS;
}

Result check_range(uint64_t ptr, size_t bytes, const char* call, const char* what) {
    Memory& m = memory();
    std::lock_guard<std::mutex> lock(m.mutex);
    const uintptr_t p = uintptr_t(ptr);
    auto it = m.live.upper_bound(p);
    if (it != m.live.begin()) {
        --it;
        const Allocation& a = it->second;
        const uintptr_t data = uintptr_t(a.data);
        if (p >= data && p <= data + a.size && bytes <= data + a.size - p) return SUCCESS;
        if (p >= data && p < data + a.size) {
            return fail(ERROR_INVALID_VALUE, std::string(call) + ": " + what + " " + hex(p) + " + " +
                                                 std::to_string(bytes) + " bytes runs " +
                                                 std::to_string(p + bytes - (data + a.size)) + " bytes past the end of the " +
                                                 std::to_string(a.size) + "-byte allocation at " + hex(data));
        }
    }
    const Allocation* near = owner_of(m, p);
    return fail(ERROR_INVALID_VALUE, std::string(call) + ": " + what + " " + hex(p) + " (" + std::to_string(bytes) +
                                         " bytes) is not inside a live allocation" +
                                         (near ? " (it is " + describe(*near, p) + ")" : ""));
}

void mem_info(size_t* free_bytes, size_t* total_bytes) {
    Memory& m = memory();
    std::lock_guard<std::mutex> lock(m.mutex);
    if (total_bytes) *total_bytes = mem_capacity();
    if (free_bytes) *free_bytes = mem_capacity() - m.allocated;
}

std::string describe_address(uintptr_t addr) {
    Memory& m = memory();
    std::lock_guard<std::mutex> lock(m.mutex);
    const Allocation* a = owner_of(m, addr);
    if (a == nullptr) return "address " + hex(addr) + ", not in any allocation";
    return "address " + hex(addr) + ", " + describe(*a, addr);
}

std::string check_red_zones() {
    Memory& m = memory();
    std::lock_guard<std::mutex> lock(m.mutex);
    std::string found;
    for (auto& entry : m.live) {
        Allocation& a = entry.second;
        const char* bad = first_corrupt_red_zone(a);
        if (bad == nullptr) continue;
        if (found.empty()) found = "address " + hex(uintptr_t(bad)) + ", " + describe(a, uintptr_t(bad));
        memset(a.red_zone, CANARY_BYTE, size_t(a.data - a.red_zone));
        memset(a.data + a.size, CANARY_BYTE, a.body - a.size);
    }
    return found;
}

}  // namespace halo_driver
