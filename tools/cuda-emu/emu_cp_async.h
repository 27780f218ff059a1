// cp.async under emu.h: an N-byte copy (16 for cp_async16) that refuses misaligned addresses,
// copies `bytes` (0 or N; fewer zero-fill the rest, as cp.async's src-size does) and lands either
// at once or, with emu_cp_defer, only when cp_async_wait retires its commit group: the latest
// moment it may land on a GPU, so a kernel that reads a tile before its wait sees stale bytes.
// emu_cp_drained() says whether this thread has no copy left in flight (call it as a block ends).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

inline bool emu_cp_defer = false;
struct EmuCopy {
    void* dst;
    const void* src;
    int n, bytes;
    void land() const {
        const int b = std::min(bytes, n);
        if (b > 0) memcpy(dst, src, b);
        memset((char*)dst + b, 0, n - b);
    }
};
inline thread_local std::vector<std::vector<EmuCopy>> emu_cp_groups;  // committed, oldest first
inline thread_local std::vector<EmuCopy> emu_cp_open;

template <int N> inline void cp_async_n(void* dst, const void* src, int bytes) {
    if ((uintptr_t)src % N || (uintptr_t)dst % N) { fprintf(stderr, "misaligned %d-byte copy\n", N); exit(1); }
    const EmuCopy c{dst, src, N, bytes};
    if (emu_cp_defer) emu_cp_open.push_back(c);
    else c.land();
}
inline void cp_async16(void* dst, const void* src, int bytes) { cp_async_n<16>(dst, src, bytes); }
inline void cp_async_commit() {
    emu_cp_groups.push_back(std::move(emu_cp_open));
    emu_cp_open.clear();
}
template <int N> inline void cp_async_wait() {
    while (emu_cp_groups.size() > (size_t)N) {
        for (const EmuCopy& c : emu_cp_groups.front()) c.land();
        emu_cp_groups.erase(emu_cp_groups.begin());
    }
    if (N == 0 && !emu_cp_open.empty()) { fprintf(stderr, "cp.async left uncommitted\n"); exit(1); }
}
inline bool emu_cp_drained() { return emu_cp_groups.empty() && emu_cp_open.empty(); }
