// Emulated stand-in for plugins/kernels/ternaryPtx.cuh (same functions, same signatures), used
// by the CPU kernel emulator. Fragment layouts follow the PTX ISA sections "Matrix Fragments for
// mma.m16n8k16 / m16n8k32", "ldmatrix" and "Register Fragments ... wgmma.m64nNk16 / m64nNk32";
// the wgmma B operand is read through the K-major 128-byte-swizzle descriptor model; e4m3 values
// are exact (emu::e4m3ToFloat), sums fp32 in k order. mbarrier phases and the bulk tensor copy
// (TMA, 128-byte swizzle on the shared side, zero fill out of bounds) are modelled below.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda.h"
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

#define TERDIT_FP8_MMA 1

//! mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32: A 16 x 32 (a0: row g, columns 4t .. 4t + 3
//! (bytes 0..3); a1: row g + 8; a2 / a3: columns 16 + 4t ..), B 32 x 8 (b0: rows 4t .., column g;
//! b1: rows 16 + 4t ..), C / D as m16n8k16.
inline void mma16832E4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
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
    float A[16][32];
    float B[32][8];
    for (unsigned l = 0; l < 32; ++l)
    {
        auto const& s = slots[base + l];
        unsigned const g = l >> 2;
        unsigned const t = l & 3;
        for (int e = 0; e < 4; ++e)
        {
            A[g][4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[0] >> (8 * e)));
            A[g + 8][4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[1] >> (8 * e)));
            A[g][16 + 4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[2] >> (8 * e)));
            A[g + 8][16 + 4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[3] >> (8 * e)));
            B[4 * t + e][g] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[4] >> (8 * e)));
            B[16 + 4 * t + e][g] = emu::e4m3ToFloat(static_cast<uint8_t>(s.u[5] >> (8 * e)));
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
        for (int k = 0; k < 32; ++k)
        {
            acc += A[row][k] * B[k][col];
        }
        d[i] = acc;
    }
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

//! Operand tag of the e4m3 wgmma.
struct E4m3Operand
{
};

namespace detail
{
template <typename Op>
constexpr int wgmmaKind()
{
    return std::is_same<Op, __nv_bfloat16>::value ? 0 : (std::is_same<Op, __half>::value ? 1 : 2);
}

//! Bytes of B element (token n, byte b of its row's k slice) of a K-major, 128-byte-swizzle
//! descriptor.
inline uint8_t wgmmaBByte(uint64_t descB, unsigned n, unsigned b)
{
    uint32_t const start = static_cast<uint32_t>(descB & 0x3FFF) << 4;
    uint32_t const sbo = static_cast<uint32_t>((descB >> 32) & 0x3FFF) << 4;
    uint32_t addr = start + (n >> 3) * sbo + (n & 7) * 128 + b;
    addr ^= ((addr >> 7) & 7u) << 4; // 128-byte swizzle: 16-byte chunk ^= row within 8
    return *emu::sharedPtr(addr);
}

//! The B tile a wgmma reads: N rows x 32 bytes (16 bf16 / fp16 or 32 e4m3 columns).
inline std::vector<uint8_t> wgmmaBTile(uint64_t descB, int n)
{
    std::vector<uint8_t> tile(static_cast<size_t>(n) * 32);
    for (int r = 0; r < n; ++r)
    {
        for (unsigned b = 0; b < 32; ++b)
        {
            tile[r * 32 + b] = wgmmaBByte(descB, r, b);
        }
    }
    return tile;
}

inline float bElement(std::vector<uint8_t> const& tile, int kind, unsigned n, unsigned k)
{
    if (kind == 2)
    {
        return emu::e4m3ToFloat(tile[n * 32 + k]);
    }
    uint16_t const bits = static_cast<uint16_t>(tile[n * 32 + 2 * k] | (tile[n * 32 + 2 * k + 1] << 8));
    return kind == 0 ? emu::bf16ToFloat(bits) : emu::halfToFloat(bits);
}

//! Performs one retiring wgmma (all 128 threads of the warpgroup call this together).
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
    if (op.checkD && std::memcmp(op.d, op.dSnap.data(), sizeof(float) * op.nAcc) != 0)
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
    int const n = op.nAcc * 2;
    std::vector<uint8_t> const tile = wgmmaBTile(op.desc, n);
    if (l == 0 && tile != op.bSnap)
    {
        emu::fail("wgmma: shared memory of the B tile changed while the wgmma was in flight");
    }
    int const kDim = op.kind == 2 ? 32 : 16;
    float A[64][32];
    for (unsigned q = 0; q < 128; ++q)
    {
        auto const& sq = slots[base + q];
        unsigned const w = q >> 5;
        unsigned const g = (q & 31) >> 2;
        unsigned const t = q & 3;
        if (op.kind == 2)
        {
            for (int e = 0; e < 4; ++e)
            {
                A[16 * w + g][4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(sq.u[0] >> (8 * e)));
                A[16 * w + g + 8][4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(sq.u[1] >> (8 * e)));
                A[16 * w + g][16 + 4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(sq.u[2] >> (8 * e)));
                A[16 * w + g + 8][16 + 4 * t + e] = emu::e4m3ToFloat(static_cast<uint8_t>(sq.u[3] >> (8 * e)));
            }
        }
        else
        {
            bool const bf = op.kind == 0;
            auto h = [bf](uint32_t r, int e) {
                uint16_t const bits = static_cast<uint16_t>(r >> (16 * e));
                return bf ? emu::bf16ToFloat(bits) : emu::halfToFloat(bits);
            };
            for (int e = 0; e < 2; ++e)
            {
                A[16 * w + g][2 * t + e] = h(sq.u[0], e);
                A[16 * w + g + 8][2 * t + e] = h(sq.u[1], e);
                A[16 * w + g][2 * t + 8 + e] = h(sq.u[2], e);
                A[16 * w + g + 8][2 * t + 8 + e] = h(sq.u[3], e);
            }
        }
    }
    emu::syncGroup();
    unsigned const w = l >> 5;
    unsigned const g = (l & 31) >> 2;
    unsigned const t = l & 3;
    for (int i = 0; i < op.nAcc; ++i)
    {
        unsigned const row = 16 * w + g + ((i & 2) ? 8 : 0);
        unsigned const col = 8 * (i >> 2) + 2 * t + (i & 1);
        float acc = op.accumulate ? op.d[i] : 0.0f;
        for (int k = 0; k < kDim; ++k)
        {
            acc += A[row][k] * bElement(tile, op.kind, col, k);
        }
        op.d[i] = acc;
    }
}

inline void wgmmaIssue(float* d, int nAcc, int kind, uint32_t const* aRef, uint32_t const (&a)[4], uint64_t descB,
    bool accumulate)
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
    op.nAcc = nAcc;
    op.kind = kind;
    op.aRef = aRef;
    std::memcpy(op.a, a, sizeof(op.a));
    op.desc = descB;
    op.accumulate = accumulate;
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
        op.dSnap.assign(d, d + nAcc);
    }
    if ((emu::tls.thread.x & 127) == 0)
    {
        op.bSnap = wgmmaBTile(descB, nAcc * 2);
    }
    emu::tls.mmas.push_back(std::move(op));
}
} // namespace detail

//! wgmma.mma_async m64nNk16 (bf16 / fp16) or m64nNk32 (e4m3), A in registers (warp w of the
//! warpgroup: rows 16w .. 16w + 15 in the mma.m16n8k16 / m16n8k32 A layout), B = N x k from shared
//! memory via a K-major, 128-byte-swizzle descriptor, D: element 4j + e of lane (g, t) in warp w =
//! row 16w + g (+8 for e >= 2), column 8j + 2t + (e & 1); `accumulate` 0 overwrites D.
template <typename Op, int N>
inline void wgmmaRS(float (&d)[N / 2], uint32_t const (&a)[4], uint64_t descB, uint32_t accumulate)
{
    detail::wgmmaIssue(d, N / 2, detail::wgmmaKind<Op>(), a, a, descB, accumulate != 0);
}

template <typename T>
inline void wgmmaM64N128K16(float (&d)[64], uint32_t const (&a)[4], uint64_t descB)
{
    wgmmaRS<T, 128>(d, a, descB, 1u);
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

//! setmaxnreg: registers are not modelled (ptxas checks the budget in the real build).
template <int kREGS, bool kINC>
inline void setMaxRegisters()
{
}

// ---- mbarrier and the bulk tensor copy engine -------------------------------------------------
//
// An mbarrier completes a phase when all `count` arrivals of the phase have happened and its
// transaction count is back to zero. Bulk tensor copies are recorded at issue and land (copy,
// then complete_tx of their bytes) when some thread waits on their barrier, so a kernel that
// reads a stage without waiting on its barrier reads poison; a copy nobody waits for fails the
// kernel at exit. A wait that never completes fails after 60 s (a deadlock in the protocol).

namespace detail
{
inline emu::Cta::Mbar& mbarLocked(uint32_t bar)
{
    auto& mbars = emu::tls.cta->mbars;
    auto it = mbars.find(bar);
    if (it == mbars.end())
    {
        emu::fail("mbarrier used before mbarrier.init");
    }
    return it->second;
}

inline void mbarCompleteLocked(emu::Cta::Mbar& m)
{
    if (m.pending < 0)
    {
        emu::fail("mbarrier: more arrivals than its count in one phase");
    }
    if (m.pending == 0 && m.tx == 0)
    {
        ++m.phase;
        m.pending = m.count;
    }
}

inline void bulkPerformLocked(emu::Cta::Bulk const& c)
{
    emu::TmaDesc d;
    std::memcpy(&d, c.map, sizeof(d));
    uint32_t total = 1;
    for (uint32_t i = 0; i < d.rank; ++i)
    {
        total *= d.box[i];
    }
    uint8_t* const smem = emu::tls.cta->smemBase();
    for (uint32_t idx = 0; idx < total; ++idx)
    {
        uint32_t rem = idx;
        bool inside = true;
        uint64_t offset = 0;
        for (uint32_t i = 0; i < d.rank; ++i)
        {
            int64_t const coord = static_cast<int64_t>(c.coords[i]) + rem % d.box[i];
            rem /= d.box[i];
            if (coord < 0 || static_cast<uint64_t>(coord) >= d.dims[i])
            {
                inside = false;
            }
            offset += static_cast<uint64_t>(coord) * d.strides[i];
        }
        for (uint32_t b = 0; b < d.elemBytes; ++b)
        {
            uint32_t addr = c.dst + idx * d.elemBytes + b;
            if (d.swizzle128)
            {
                addr ^= ((addr >> 7) & 7u) << 4;
            }
            if (addr >= emu::tls.cta->smem.size() - 1024)
            {
                emu::fail("bulk tensor copy out of the dynamic shared memory");
            }
            smem[addr] = inside ? d.base[offset + b] : 0; // out of bounds: zero fill
        }
    }
    auto& m = mbarLocked(c.bar);
    m.tx -= static_cast<int64_t>(total) * d.elemBytes;
    mbarCompleteLocked(m);
}

inline void tmaLoad(uint32_t dst, void const* map, uint32_t bar, std::initializer_list<int32_t> coords)
{
    emu::TmaDesc d;
    std::memcpy(&d, map, sizeof(d));
    if (coords.size() != d.rank)
    {
        emu::fail("bulk tensor copy: coordinate count differs from the tensor map's rank");
    }
    if (dst % (d.swizzle128 ? 1024u : 128u) != 0)
    {
        emu::fail("bulk tensor copy: shared destination misaligned (128 B, 1024 B with 128-byte swizzle)");
    }
    emu::Cta::Bulk c{};
    std::memcpy(c.map, map, sizeof(c.map));
    int i = 0;
    for (int32_t v : coords)
    {
        c.coords[i++] = v;
    }
    c.dst = dst;
    c.bar = bar;
    std::lock_guard<std::mutex> lock(emu::tls.cta->mbarMutex);
    mbarLocked(bar); // must exist
    emu::tls.cta->bulk.push_back(c);
}
} // namespace detail

inline void mbarInit(uint32_t bar, uint32_t count)
{
    if (bar % 8 != 0)
    {
        emu::fail("mbarrier not 8-byte aligned");
    }
    emu::sharedPtr(bar + 7);
    std::lock_guard<std::mutex> lock(emu::tls.cta->mbarMutex);
    emu::Cta::Mbar m;
    m.count = static_cast<int>(count);
    m.pending = static_cast<int>(count);
    emu::tls.cta->mbars[bar] = m;
}

inline void fenceMbarrierInit() {}

inline void mbarArriveExpectTx(uint32_t bar, uint32_t bytes)
{
    std::lock_guard<std::mutex> lock(emu::tls.cta->mbarMutex);
    auto& m = detail::mbarLocked(bar);
    m.tx += bytes;
    --m.pending;
    detail::mbarCompleteLocked(m);
}

inline void mbarArrive(uint32_t bar)
{
    std::lock_guard<std::mutex> lock(emu::tls.cta->mbarMutex);
    auto& m = detail::mbarLocked(bar);
    --m.pending;
    detail::mbarCompleteLocked(m);
}

inline bool mbarTryWait(uint32_t bar, uint32_t parity)
{
    bool done;
    {
        std::lock_guard<std::mutex> lock(emu::tls.cta->mbarMutex);
        auto& bulk = emu::tls.cta->bulk;
        std::vector<emu::Cta::Bulk> keep;
        std::vector<emu::Cta::Bulk> land;
        for (auto const& c : bulk)
        {
            (c.bar == bar ? land : keep).push_back(c);
        }
        bulk.swap(keep);
        for (auto const& c : land)
        {
            detail::bulkPerformLocked(c);
        }
        done = (detail::mbarLocked(bar).phase & 1u) != (parity & 1u);
    }
    if (!done)
    {
        std::this_thread::yield();
    }
    return done;
}

inline void mbarWait(uint32_t bar, uint32_t parity)
{
    // Back off after a few polls: hundreds of waiting threads that only yield would starve the
    // one producer thread that can complete the phase (the CPU has a few cores, not an SM).
    auto const start = std::chrono::steady_clock::now();
    for (int polls = 0; !mbarTryWait(bar, parity); ++polls)
    {
        if (polls >= 16)
        {
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        if (std::chrono::steady_clock::now() - start > std::chrono::seconds(60))
        {
            emu::fail("mbarrier wait did not complete in 60 s (deadlock in the pipeline protocol)");
        }
    }
}

inline void tmaLoad2d(uint32_t dst, void const* map, uint32_t bar, int32_t c0, int32_t c1)
{
    detail::tmaLoad(dst, map, bar, {c0, c1});
}

inline void tmaLoad3d(uint32_t dst, void const* map, uint32_t bar, int32_t c0, int32_t c1, int32_t c2)
{
    detail::tmaLoad(dst, map, bar, {c0, c1, c2});
}

} // namespace kernels
} // namespace terdit
