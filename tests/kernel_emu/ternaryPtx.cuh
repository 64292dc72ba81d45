// Emulated stand-in for plugins/kernels/ternaryPtx.cuh (same functions, same signatures), used
// by the CPU kernel emulator. Fragment layouts follow the PTX ISA sections "Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix" and "Register Fragments ... wgmma.m64nNk16";
// the wgmma B operand is read through the K-major 128-byte-swizzle descriptor model.
#pragma once

#include <cstdint>
#include <cstring>

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

//! wgmma.mma_async m64n128k16, A in registers (warp w of the warpgroup holds rows 16w .. 16w + 15
//! in the mma.m16n8k16 A layout), B = 128 x 16 from shared memory via a K-major, 128-byte-swizzle
//! descriptor, D: element 4j + e of lane (g, t) in warp w = row 16w + g (+8 for e >= 2),
//! column 8j + 2t + (e & 1). Performed synchronously.
template <typename T>
inline void wgmmaM64N128K16(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t descB)
{
    auto& slots = emu::tls.cta->slots;
    unsigned const tid = emu::tls.thread.x;
    unsigned const base = (tid >> 7) * 128;
    auto& my = slots[tid];
    my.u[0] = a0;
    my.u[1] = a1;
    my.u[2] = a2;
    my.u[3] = a3;
    my.desc = descB;
    emu::syncGroup();
    if (slots[base].desc != descB)
    {
        emu::fail("wgmma: lanes of a warpgroup passed different descriptors");
    }
    if ((descB >> 62) != 1 || ((descB >> 49) & 7) != 0)
    {
        emu::fail("wgmma: descriptor is not 128-byte swizzle with base offset 0");
    }
    uint32_t const start = static_cast<uint32_t>(descB & 0x3FFF) << 4;
    uint32_t const sbo = static_cast<uint32_t>((descB >> 32) & 0x3FFF) << 4;
    float A[64][16];
    for (unsigned l = 0; l < 128; ++l)
    {
        auto const& s = slots[base + l];
        unsigned const w = l >> 5;
        unsigned const g = (l & 31) >> 2;
        unsigned const t = l & 3;
        for (int e = 0; e < 2; ++e)
        {
            A[16 * w + g][2 * t + e] = detail::half<T>(s.u[0], e);
            A[16 * w + g + 8][2 * t + e] = detail::half<T>(s.u[1], e);
            A[16 * w + g][2 * t + 8 + e] = detail::half<T>(s.u[2], e);
            A[16 * w + g + 8][2 * t + 8 + e] = detail::half<T>(s.u[3], e);
        }
    }
    emu::syncGroup();
    unsigned const l = tid & 127;
    unsigned const w = l >> 5;
    unsigned const g = (l & 31) >> 2;
    unsigned const t = l & 3;
    for (int i = 0; i < 64; ++i)
    {
        unsigned const row = 16 * w + g + ((i & 2) ? 8 : 0);
        unsigned const n = 8 * (i >> 2) + 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k)
        {
            uint32_t addr = start + (n >> 3) * sbo + (n & 7) * 128 + k * 2;
            addr ^= ((addr >> 7) & 7u) << 4; // 128-byte swizzle: 16-byte chunk ^= row within 8
            uint16_t bits;
            std::memcpy(&bits, emu::sharedPtr(addr), 2);
            acc += A[row][k] * detail::lo<T>(bits);
        }
        d[i] = acc;
    }
}

inline void wgmmaFence() {}
inline void wgmmaCommit() {}
inline void wgmmaWaitAll() {}
inline void fenceProxyAsync() {}
inline void pin(float&) {}
inline void pin(uint32_t&) {}

} // namespace kernels
} // namespace terdit
