// Emulated stand-in for plugins/kernels/ternaryPtx.cuh (same functions, same signatures), used
// by the CPU kernel emulator. Fragment layouts follow the PTX ISA sections "Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix" and "Register Fragments ... wgmma.m64nNk16";
// the wgmma B operand is read through the K-major 128-byte-swizzle descriptor model.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "emu.h"

namespace terdit
{
namespace kernels
{

namespace detail
{
template <typename T>
inline float lo(uint32_t r);
template <>
inline float lo<__nv_bfloat16>(uint32_t r)
{
    return emu::bf16ToFloat(static_cast<uint16_t>(r & 0xFFFF));
}
template <>
inline float lo<__half>(uint32_t r)
{
    return emu::halfToFloat(static_cast<uint16_t>(r & 0xFFFF));
}
template <typename T>
inline float hi(uint32_t r)
{
    return lo<T>(r >> 16);
}
template <typename T>
inline float half(uint32_t r, int h)
{
    return h ? hi<T>(r) : lo<T>(r);
}
} // namespace detail

//! mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: A 16x16 (a0: row g, cols 2t..; a1: row g+8;
//! a2: row g, cols 2t+8..; a3: row g+8, cols 2t+8..), B 16x8 (b0: rows 2t.., col g; b1: rows
//! 2t+8..), C/D (c0,c1: row g, cols 2t, 2t+1; c2,c3: row g+8).
template <typename T>
inline void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
    auto& slots = emu::tls.cta->slots;
    unsigned const lane = emu::laneId();
    unsigned const base = emu::warpId() * 32;
    auto& my = slots[base + lane];
    my.u[0] = a0;
    my.u[1] = a1;
    my.u[2] = a2;
    my.u[3] = a3;
    my.u[4] = b0;
    my.u[5] = b1;
    emu::syncWarp();
    float A[16][16];
    float B[16][8];
    for (unsigned l = 0; l < 32; ++l)
    {
        auto const& s = slots[base + l];
        unsigned const g = l >> 2;
        unsigned const t = l & 3;
        for (int e = 0; e < 2; ++e)
        {
            A[g][2 * t + e] = detail::half<T>(s.u[0], e);
            A[g + 8][2 * t + e] = detail::half<T>(s.u[1], e);
            A[g][2 * t + 8 + e] = detail::half<T>(s.u[2], e);
            A[g + 8][2 * t + 8 + e] = detail::half<T>(s.u[3], e);
            B[2 * t + e][g] = detail::half<T>(s.u[4], e);
            B[2 * t + 8 + e][g] = detail::half<T>(s.u[5], e);
        }
    }
    emu::syncWarp();
    unsigned const g = lane >> 2;
    unsigned const t = lane & 3;
    for (int i = 0; i < 4; ++i)
    {
        unsigned const row = g + ((i & 2) ? 8 : 0);
        unsigned const col = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k)
        {
            acc += A[row][k] * B[k][col];
        }
        d[i] = acc;
    }
}

//! ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the row address of matrix l / 8, row
//! l % 8; register q of lane l gets matrix q, row l / 4, elements 2 (l % 4), +1.
inline void ldmatrixX4(uint32_t (&r)[4], uint32_t smemAddr)
{
    auto& slots = emu::tls.cta->slots;
    unsigned const lane = emu::laneId();
    unsigned const base = emu::warpId() * 32;
    if (smemAddr % 16 != 0)
    {
        emu::fail("ldmatrix row address not 16-byte aligned");
    }
    slots[base + lane].u[7] = smemAddr;
    emu::syncWarp();
    for (int q = 0; q < 4; ++q)
    {
        uint32_t const rowAddr = slots[base + q * 8 + lane / 4].u[7];
        std::memcpy(&r[q], emu::sharedPtr(rowAddr + 4 * (lane % 4)), 4);
    }
    emu::syncWarp();
}

//! cp.async: recorded now, performed when a cp.async.wait_group retires its group.
inline void cpAsyncN(uint32_t dst, void const* src, uint32_t bytes, uint32_t srcBytes)
{
    emu::checkAlign(src, bytes, "cp.async source misaligned");
    if (dst % bytes != 0)
    {
        emu::fail("cp.async destination misaligned");
    }
    if (srcBytes != 0 && srcBytes != bytes)
    {
        emu::fail("cp.async src-size other than 0 or the full size");
    }
    emu::tls.pending.push_back(emu::PendingCopy{emu::sharedPtr(dst), static_cast<uint8_t const*>(src), bytes, srcBytes,
        emu::tls.committed});
}

inline void cpAsync16(uint32_t dst, void const* src, uint32_t srcBytes)
{
    cpAsyncN(dst, src, 16, srcBytes);
}

inline void cpAsync4(uint32_t dst, void const* src, uint32_t srcBytes)
{
    cpAsyncN(dst, src, 4, srcBytes);
}

inline void cpAsyncCommit()
{
    ++emu::tls.committed;
}

template <int N>
inline void cpAsyncWait()
{
    // Groups 0 .. committed - 1 exist; all but the newest N must be complete.
    int const limit = emu::tls.committed - N;
    auto& pending = emu::tls.pending;
    std::vector<emu::PendingCopy> keep;
    for (auto const& c : pending)
    {
        if (c.group < limit)
        {
            if (c.srcBytes == 0)
            {
                std::memset(c.dst, 0, c.bytes);
            }
            else
            {
                std::memcpy(c.dst, c.src, c.bytes);
            }
        }
        else
        {
            keep.push_back(c);
        }
    }
    pending.swap(keep);
}

inline uint4 ldgStream16(void const* p)
{
    emu::checkAlign(p, 16, "16-byte global load misaligned");
    uint4 r;
    std::memcpy(&r, p, 16);
    return r;
}

inline uint32_t ldgStream4(void const* p)
{
    emu::checkAlign(p, 4, "4-byte global load misaligned");
    uint32_t r;
    std::memcpy(&r, p, 4);
    return r;
}

inline uint4 ldgCached16(void const* p)
{
    return ldgStream16(p);
}

// ---- wgmma -------------------------------------------------------------------------------------
//
// wgmma.mma_async is asynchronous: an issued instruction joins the open group, wgmma.commit_group
// closes the group, wgmma.wait_group N retires every committed group but the newest N, in order.
// The emulator performs an instruction only when it retires, which makes a kernel wrong (and
// the sweep fail) when it reads the accumulators too early; and it fails outright when the
// kernel overwrote the A fragment (passed as an array), the accumulators or the B tile in shared
// memory while the instruction was in flight. Every group must begin with wgmma.fence (the
// kernels write the A fragments before each group, and PTX requires the fence between such
// writes and the wgmma reading them).

namespace detail
{
//! B element (token n, column k) of a K-major, 128-byte-swizzle descriptor.
inline uint16_t wgmmaB(uint64_t descB, unsigned n, unsigned k)
{
    uint32_t const start = static_cast<uint32_t>(descB & 0x3FFF) << 4;
    uint32_t const sbo = static_cast<uint32_t>((descB >> 32) & 0x3FFF) << 4;
    uint32_t addr = start + (n >> 3) * sbo + (n & 7) * 128 + k * 2;
    addr ^= ((addr >> 7) & 7u) << 4; // 128-byte swizzle: 16-byte chunk ^= row within 8
    uint16_t bits;
    std::memcpy(&bits, emu::sharedPtr(addr), 2);
    return bits;
}

inline std::vector<uint16_t> wgmmaBTile(uint64_t descB)
{
    std::vector<uint16_t> tile(128 * 16);
    for (unsigned n = 0; n < 128; ++n)
    {
        for (unsigned k = 0; k < 16; ++k)
        {
            tile[n * 16 + k] = wgmmaB(descB, n, k);
        }
    }
    return tile;
}

inline float toFloat(uint16_t bits, bool bf16)
{
    return bf16 ? emu::bf16ToFloat(bits) : emu::halfToFloat(bits);
}

//! Performs one retiring wgmma m64n128k16 (all 128 threads of the warpgroup call this together).
inline void wgmmaPerform(emu::PendingMma const& op)
{
    auto& slots = emu::tls.cta->slots;
    unsigned const tid = emu::tls.thread.x;
    unsigned const base = (tid >> 7) * 128;
    unsigned const l = tid & 127;
    uint32_t a[4];
    std::memcpy(a, op.aRef != nullptr ? op.aRef : op.a, sizeof(a));
    if (std::memcmp(a, op.a, sizeof(a)) != 0)
    {
        emu::fail("wgmma: A fragment registers were overwritten while the wgmma was in flight");
    }
    if (op.checkD && std::memcmp(op.d, op.dSnap, sizeof(op.dSnap)) != 0)
    {
        emu::fail("wgmma: accumulator registers were modified while the wgmma was in flight");
    }
    auto& my = slots[tid];
    std::memcpy(my.u, a, sizeof(a));
    my.desc = op.desc;
    emu::syncGroup();
    if (slots[base].desc != op.desc)
    {
        emu::fail("wgmma: lanes of a warpgroup passed different descriptors");
    }
    if (l == 0 && wgmmaBTile(op.desc) != op.bSnap)
    {
        emu::fail("wgmma: shared memory of the B tile changed while the wgmma was in flight");
    }
    float A[64][16];
    for (unsigned q = 0; q < 128; ++q)
    {
        auto const& sq = slots[base + q];
        unsigned const w = q >> 5;
        unsigned const g = (q & 31) >> 2;
        unsigned const t = q & 3;
        for (int e = 0; e < 2; ++e)
        {
            A[16 * w + g][2 * t + e] = toFloat(static_cast<uint16_t>(sq.u[0] >> (16 * e)), op.bf16);
            A[16 * w + g + 8][2 * t + e] = toFloat(static_cast<uint16_t>(sq.u[1] >> (16 * e)), op.bf16);
            A[16 * w + g][2 * t + 8 + e] = toFloat(static_cast<uint16_t>(sq.u[2] >> (16 * e)), op.bf16);
            A[16 * w + g + 8][2 * t + 8 + e] = toFloat(static_cast<uint16_t>(sq.u[3] >> (16 * e)), op.bf16);
        }
    }
    emu::syncGroup();
    unsigned const w = l >> 5;
    unsigned const g = (l & 31) >> 2;
    unsigned const t = l & 3;
    for (int i = 0; i < 64; ++i)
    {
        unsigned const row = 16 * w + g + ((i & 2) ? 8 : 0);
        unsigned const n = 8 * (i >> 2) + 2 * t + (i & 1);
        float acc = op.d[i];
        for (unsigned k = 0; k < 16; ++k)
        {
            acc += A[row][k] * toFloat(wgmmaB(op.desc, n, k), op.bf16);
        }
        op.d[i] = acc;
    }
}

template <typename T>
inline void wgmmaIssue(float (&d)[64], uint32_t const* aRef, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
    uint64_t descB)
{
    if (!emu::tls.mmaFenced)
    {
        emu::fail("wgmma.mma_async in a group that did not begin with wgmma.fence");
    }
    if ((descB >> 62) != 1 || ((descB >> 49) & 7) != 0)
    {
        emu::fail("wgmma: descriptor is not 128-byte swizzle with base offset 0");
    }
    emu::PendingMma op;
    op.d = d;
    op.aRef = aRef;
    op.a[0] = a0;
    op.a[1] = a1;
    op.a[2] = a2;
    op.a[3] = a3;
    op.desc = descB;
    op.bf16 = std::is_same<T, __nv_bfloat16>::value;
    op.checkD = true;
    for (auto const& other : emu::tls.mmas)
    {
        if (other.d == d)
        {
            op.checkD = false; // chained on the same accumulators: the oldest one checks them
        }
    }
    if (op.checkD)
    {
        std::memcpy(op.dSnap, d, sizeof(op.dSnap));
    }
    if ((emu::tls.thread.x & 127) == 0)
    {
        op.bSnap = wgmmaBTile(descB);
    }
    emu::tls.mmas.push_back(std::move(op));
}
} // namespace detail

//! wgmma.mma_async m64n128k16, A in registers (warp w of the warpgroup holds rows 16w .. 16w + 15
//! in the mma.m16n8k16 A layout), B = 128 x 16 from shared memory via a K-major, 128-byte-swizzle
//! descriptor, D: element 4j + e of lane (g, t) in warp w = row 16w + g (+8 for e >= 2),
//! column 8j + 2t + (e & 1).
template <typename T>
inline void wgmmaM64N128K16(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t descB)
{
    detail::wgmmaIssue<T>(d, nullptr, a0, a1, a2, a3, descB);
}

template <typename T>
inline void wgmmaM64N128K16(float (&d)[64], uint32_t const (&a)[4], uint64_t descB)
{
    detail::wgmmaIssue<T>(d, a, a[0], a[1], a[2], a[3], descB);
}

inline void wgmmaFence()
{
    emu::tls.mmaFenced = true;
}

inline void wgmmaCommit()
{
    for (auto& op : emu::tls.mmas)
    {
        if (op.group < 0)
        {
            op.group = emu::tls.mmaGroups;
        }
    }
    ++emu::tls.mmaGroups;
    emu::tls.mmaFenced = false;
}

template <int N>
inline void wgmmaWait()
{
    auto& mmas = emu::tls.mmas;
    for (auto const& op : mmas)
    {
        if (op.group < 0)
        {
            emu::fail("wgmma.wait_group with uncommitted wgmma.mma_async (commit_group first)");
        }
    }
    int const limit = emu::tls.mmaGroups - N; // groups older than this one retire
    size_t done = 0;
    while (done < mmas.size() && mmas[done].group < limit)
    {
        detail::wgmmaPerform(mmas[done]);
        ++done;
    }
    mmas.erase(mmas.begin(), mmas.begin() + static_cast<std::ptrdiff_t>(done));
}

inline void wgmmaWaitAll()
{
    wgmmaWait<0>();
}

inline void fenceProxyAsync() {}
inline void pin(float&) {}
inline void pin(uint32_t&) {}

} // namespace kernels
} // namespace terdit
