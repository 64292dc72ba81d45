/*
 * The blocked GEMM driver shared by the vector ISAs, included by each ISA translation unit (so
 * it is compiled with that unit's -m flags). The ISA traits class I supplies the register tiles:
 *
 *   I::kMRI, I::kMRF        rows of X per int8 / fp32 tile (as many as fit the registers)
 *   I::kNS                  output columns per strip (a multiple of its vector width)
 *   I::kGROUPS              k groups of 4 per int8 chunk (AVX2 sums in int16: at most 64)
 *   I::kKC                  k per fp32 chunk
 *   the int8 primitives of driver::int8Tile     c[MR][kNS] (int32) += a-bytes . panel-codes
 *   I::f32Tile<MR>(panel, a, lda, kc, c)        c[MR][kNS] (fp32)  += a . panel
 *
 * Why this shape: the token GEMMs of a DiT are large-M, so the 2-bit codes of one strip of
 * output columns are expanded once per chunk of K into a small panel (bytes for int8, floats for
 * fp32) that stays in L1 and is reused by every row tile; the weights stay 2 bits in memory, and
 * no decoded copy outlives a call. The int8 panel holds the codes c = t + 1 in {0, 1, 2} as the
 * unsigned operand of the u8 x s8 dot products; sum_k c * xq = sum_k t * xq + sum_k xq, so one
 * per-row sum of the quantized activations corrects it.
 */
#pragma once

#include "cpuGemm.h"

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

//! X(0) .. X(5): one statement per row of an ISA unit's 6-row register tile (the rows keep their
//! accumulators in named variables c<row><column>: GCC 12 spills arrays of vector registers).
#define TERDIT_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

//! Rows of driver::int8Tile<I, MR>: row r keeps one accumulator per column register in named
//! variables c<r><h> (h < kNS / kACC <= 4); rows past MR and columns past the ISA's count are
//! declared but never touched, so the compiler drops them.
#define TERDIT_ROW_DECLARE(r)                                                                      \
    typename I::Acc c##r##0 = I::splat(0), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define TERDIT_ACC_DOT(r, h)                                                                       \
    if constexpr (kCols > h)                                                                       \
    {                                                                                              \
        I::dot(c##r##h, b##h, av);                                                                 \
    }
#define TERDIT_ACC_FLUSH(r, h)                                                                     \
    if constexpr (kCols > h)                                                                       \
    {                                                                                              \
        I::flushInto(c + r * I::kNS + h * I::kACC, c##r##h);                                       \
    }
#define TERDIT_ROW_DOT(r)                                                                          \
    if constexpr (MR > r)                                                                          \
    {                                                                                              \
        int32_t v;                                                                                 \
        std::memcpy(&v, a + r * lda + 4 * j, 4);                                                   \
        typename I::Acc const av = I::splat(v);                                                    \
        TERDIT_ACC_DOT(r, 0) TERDIT_ACC_DOT(r, 1) TERDIT_ACC_DOT(r, 2) TERDIT_ACC_DOT(r, 3)        \
    }
#define TERDIT_ROW_STORE(r)                                                                        \
    if constexpr (MR > r)                                                                          \
    {                                                                                              \
        TERDIT_ACC_FLUSH(r, 0) TERDIT_ACC_FLUSH(r, 1) TERDIT_ACC_FLUSH(r, 2) TERDIT_ACC_FLUSH(r, 3) \
    }

namespace terdit
{
namespace cpu
{
// Everything here is compiled once per ISA unit with that unit's -m flags: internal linkage only,
// so the linker can never hand an AVX-512 copy of a shared function to the AVX2 or portable path
// (the same reason the units use no std:: containers: their instantiations would be shared).
namespace
{
namespace driver
{

template <class T>
inline T lesser(T a, T b)
{
    return a < b ? a : b;
}

template <class T>
inline T greater(T a, T b)
{
    return a < b ? b : a;
}

//! Byte b of a k16 row holds 4 codes (k = 4g .. 4g + 3 at bits 0-1, 2-3, 4-5, 6-7): spread them
//! into the 4 bytes of one little-endian word, the layout of one column's group in the panel.
struct SpreadTable
{
    uint32_t word[256];
    float value[256][4];
    SpreadTable()
    {
        for (int b = 0; b < 256; ++b)
        {
            uint32_t v = 0;
            for (int i = 0; i < 4; ++i)
            {
                uint32_t const code = (static_cast<uint32_t>(b) >> (2 * i)) & 3U;
                v |= code << (8 * i);
                value[b][i] = static_cast<float>(static_cast<int>(code) - 1);
            }
            word[b] = v;
        }
    }
};

inline SpreadTable const& spreadTable()
{
    static SpreadTable const table;
    return table;
}

constexpr uint32_t kZERO_GROUP = 0x01010101U; // four codes of 1: weight 0

//! How a call is cut into tasks: strips of kNS columns, times blocks of rows when there are
//! too few strips to keep every thread busy.
struct Tiling
{
    int64_t strips;
    int64_t rowBlock;
    int64_t rowBlocks;

    Tiling(int64_t m, int64_t n, int64_t ns, int64_t mr, int32_t threads)
    {
        strips = (n + ns - 1) / ns;
        int64_t const wanted = 4 * greater<int32_t>(threads, 1);
        int64_t blocks = strips >= wanted ? 1 : (wanted + strips - 1) / strips;
        blocks = greater<int64_t>(1, lesser<int64_t>(blocks, (m + 4 * mr - 1) / (4 * mr)));
        rowBlock = (m + blocks - 1) / blocks;
        rowBlock = (rowBlock + mr - 1) / mr * mr;
        rowBlocks = (m + rowBlock - 1) / rowBlock;
    }
};

//! c[MR][kNS] (int32) += a-bytes . panel-codes over `groups` groups of 4 bytes, from the ISA's
//! primitives: Acc, splat(4 bytes; 0 zeroes), loadCodes(64-byte aligned), dot(acc, codes,
//! activations), flushInto(int32 out, acc); each accumulator covers kACC output columns.
template <class I, int MR>
void int8Tile(uint8_t const* panel, int8_t const* a, int64_t lda, int groups, int32_t* c)
{
    constexpr int kCols = I::kNS / I::kACC;
    static_assert(MR >= 1 && MR <= 6 && kCols >= 1 && kCols <= 4, "at most 6 rows x 4 registers");
    TERDIT_TILE_ROWS(TERDIT_ROW_DECLARE)
    for (int j = 0; j < groups; ++j)
    {
        uint8_t const* codes = panel + j * I::kNS * 4;
        typename I::Acc const b0 = I::loadCodes(codes);
        typename I::Acc const b1 = kCols > 1 ? I::loadCodes(codes + I::kACC * 4) : b0;
        typename I::Acc const b2 = kCols > 2 ? I::loadCodes(codes + I::kACC * 8) : b0;
        typename I::Acc const b3 = kCols > 3 ? I::loadCodes(codes + I::kACC * 12) : b0;
        TERDIT_TILE_ROWS(TERDIT_ROW_DOT)
    }
    TERDIT_TILE_ROWS(TERDIT_ROW_STORE)
}

template <class I, int MR>
struct RowTiles
{
    //! Runs the int8 tile over rows [m0, m1), dispatching the tail to a smaller tile.
    static void int8(uint8_t const* panel, int8_t const* a, int64_t lda, int groups, int32_t* c, int64_t m0,
        int64_t m1)
    {
        int64_t m = m0;
        for (; m + MR <= m1; m += MR)
        {
            int8Tile<I, MR>(panel, a + m * lda, lda, groups, c + (m - m0) * I::kNS);
        }
        if (m < m1)
        {
            RowTiles<I, MR - 1>::int8(panel, a, lda, groups, c + (m - m0) * I::kNS, m, m1);
        }
    }

    static void f32(float const* panel, float const* a, int64_t lda, int kc, float* c, int64_t m0, int64_t m1)
    {
        int64_t m = m0;
        for (; m + MR <= m1; m += MR)
        {
            I::template f32Tile<MR>(panel, a + m * lda, lda, kc, c + (m - m0) * I::kNS);
        }
        if (m < m1)
        {
            RowTiles<I, MR - 1>::f32(panel, a, lda, kc, c + (m - m0) * I::kNS, m, m1);
        }
    }
};

template <class I>
struct RowTiles<I, 0>
{
    static void int8(uint8_t const*, int8_t const*, int64_t, int, int32_t*, int64_t, int64_t) {}
    static void f32(float const*, float const*, int64_t, int, float*, int64_t, int64_t) {}
};

//! Bytes [g0, g0 + groups) of the k16 rows n0 .. n0 + kNS - 1 as the int8 panel
//! [groups][kNS] of 4-byte code groups; rows past n read as weight 0. With AVX2, 8 rows at a time:
//! one gather of their byte g, then the 4 codes of each byte spread into its 4 bytes.
template <class I>
void buildInt8Panel(Gemm const& g, int64_t kw4, int64_t n0, int64_t g0, int groups, uint32_t* panel)
{
    SpreadTable const& t = spreadTable();
    auto const* bytes = reinterpret_cast<uint8_t const*>(g.w);
    int64_t const total = g.n * kw4;
    for (int i0 = 0; i0 < I::kNS; i0 += 8)
    {
        int64_t const last = n0 + i0 + 7;
#if defined(__AVX2__)
        if (last < g.n)
        {
            __m256i const rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(static_cast<int32_t>(kw4)));
            __m256i const lowByte = _mm256_set1_epi32(0xff);
            __m256i const spreadMask = _mm256_set1_epi32(0x03030303);
            uint8_t const* base = bytes + (n0 + i0) * kw4 + g0;
            int j = 0;
            // the gather reads 4 bytes from each row: stay inside the weights
            for (; j < groups && last * kw4 + g0 + j + 4 <= total; ++j)
            {
                __m256i const v = _mm256_and_si256(
                    _mm256_i32gather_epi32(reinterpret_cast<int const*>(base + j), rows, 1), lowByte);
                __m256i const spread = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                    _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + j * I::kNS + i0),
                    _mm256_and_si256(spread, spreadMask));
            }
            for (; j < groups; ++j)
            {
                for (int i = i0; i < i0 + 8; ++i)
                {
                    panel[j * I::kNS + i] = t.word[bytes[(n0 + i) * kw4 + g0 + j]];
                }
            }
            continue;
        }
#endif
        for (int i = i0; i < i0 + 8; ++i)
        {
            int64_t const row = n0 + i;
            for (int j = 0; j < groups; ++j)
            {
                panel[j * I::kNS + i] = row < g.n ? t.word[bytes[row * kw4 + g0 + j]] : kZERO_GROUP;
            }
        }
    }
}

//! k in [k0, k0 + kc) of the rows n0 .. n0 + kNS - 1 as the fp32 panel [kc][kNS] of -1 / 0 / +1
//! (k0 and kc multiples of 4 except at the end of K). With AVX2, 8 rows at a time as above, each
//! code mapped to its float by one permute.
template <class I>
void buildF32Panel(Gemm const& g, int64_t kw4, int64_t n0, int64_t k0, int kc, float* panel)
{
    SpreadTable const& t = spreadTable();
    auto const* bytes = reinterpret_cast<uint8_t const*>(g.w);
    int64_t const total = g.n * kw4;
    int64_t const g0 = k0 >> 2;
    int const fullGroups = kc >> 2;
    for (int i0 = 0; i0 < I::kNS; i0 += 8)
    {
        int64_t const last = n0 + i0 + 7;
        int j = 0;
#if defined(__AVX2__)
        if (last < g.n)
        {
            __m256i const rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(static_cast<int32_t>(kw4)));
            __m256 const values = _mm256_setr_ps(-1.0F, 0.0F, 1.0F, 0.0F, -1.0F, 0.0F, 1.0F, 0.0F);
            __m256i const three = _mm256_set1_epi32(3);
            uint8_t const* base = bytes + (n0 + i0) * kw4 + g0;
            for (; j < fullGroups && last * kw4 + g0 + j + 4 <= total; ++j)
            {
                __m256i const v = _mm256_i32gather_epi32(reinterpret_cast<int const*>(base + j), rows, 1);
                float* dst = panel + (4 * j) * I::kNS + i0;
                _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(values, _mm256_and_si256(v, three)));
                _mm256_storeu_ps(dst + I::kNS,
                    _mm256_permutevar8x32_ps(values, _mm256_and_si256(_mm256_srli_epi32(v, 2), three)));
                _mm256_storeu_ps(dst + 2 * I::kNS,
                    _mm256_permutevar8x32_ps(values, _mm256_and_si256(_mm256_srli_epi32(v, 4), three)));
                _mm256_storeu_ps(dst + 3 * I::kNS,
                    _mm256_permutevar8x32_ps(values, _mm256_and_si256(_mm256_srli_epi32(v, 6), three)));
            }
        }
#endif
        for (int i = i0; i < i0 + 8; ++i)
        {
            int64_t const row = n0 + i;
            uint8_t const* src = bytes + row * kw4;
            for (int kk = 4 * j; kk < kc; ++kk)
            {
                int64_t const k = k0 + kk;
                panel[kk * I::kNS + i] = row < g.n ? t.value[src[k >> 2]][k & 3] : 0.0F;
            }
        }
    }
}

//! Y[m, n0 + i] = ((acc - sum[m]) * s[m]) * scale + bias, each a separate fp32 rounding (the
//! definition's order; this file is compiled with -ffp-contract=off).
inline void int8Epilogue(Gemm const& g, Int8Rows const& a, int32_t const* c, int ns, int64_t m0, int64_t m1,
    int64_t n0)
{
    int64_t const cols = lesser<int64_t>(ns, g.n - n0);
    float const* scale = g.scale + n0;
    float const* bias = g.bias != nullptr ? g.bias + n0 : nullptr;
    for (int64_t m = m0; m < m1; ++m)
    {
        int32_t const* cm = c + (m - m0) * ns;
        int32_t const sum = a.sum[m];
        float const s = a.scale[m];
        float* y = g.y + m * g.n + n0;
        if (bias != nullptr)
        {
            for (int64_t i = 0; i < cols; ++i)
            {
                y[i] = static_cast<float>(cm[i] - sum) * s * scale[i] + bias[i];
            }
        }
        else
        {
            for (int64_t i = 0; i < cols; ++i)
            {
                y[i] = static_cast<float>(cm[i] - sum) * s * scale[i];
            }
        }
    }
}

inline void f32Epilogue(Gemm const& g, float const* c, int ns, int64_t m0, int64_t m1, int64_t n0)
{
    int64_t const cols = lesser<int64_t>(ns, g.n - n0);
    float const* scale = g.scale + n0;
    float const* bias = g.bias != nullptr ? g.bias + n0 : nullptr;
    for (int64_t m = m0; m < m1; ++m)
    {
        float const* cm = c + (m - m0) * ns;
        float* y = g.y + m * g.n + n0;
        if (bias != nullptr)
        {
            for (int64_t i = 0; i < cols; ++i)
            {
                y[i] = cm[i] * scale[i] + bias[i];
            }
        }
        else
        {
            for (int64_t i = 0; i < cols; ++i)
            {
                y[i] = cm[i] * scale[i];
            }
        }
    }
}

//! Runs body(n0, m0, m1, panel, acc) for every task (a strip of kNS columns from n0, rows
//! [m0, m1)) on the pool, with per-thread scratch: `panelBytes` for the panel, then a zeroed
//! accumulator block [m1 - m0][kNS] of 4-byte values.
template <class I, class Body>
int forEachTask(Gemm const& g, Parallel const& par, int mr, size_t panelBytes, Body const& body)
{
    Tiling const tiling(g.m, g.n, I::kNS, mr, par.threads);
    bool failed = false;
    auto task = [&](size_t index) {
        int64_t const n0 = static_cast<int64_t>(index) % tiling.strips * I::kNS;
        int64_t const m0 = static_cast<int64_t>(index) / tiling.strips * tiling.rowBlock;
        int64_t const m1 = lesser<int64_t>(g.m, m0 + tiling.rowBlock);
        size_t const accBytes = static_cast<size_t>(tiling.rowBlock) * I::kNS * 4;
        auto* base = static_cast<uint8_t*>(threadScratch(panelBytes + accBytes));
        if (base == nullptr)
        {
            failed = true;
            return;
        }
        std::memset(base + panelBytes, 0, static_cast<size_t>(m1 - m0) * I::kNS * 4);
        body(n0, m0, m1, base, base + panelBytes);
    };
    par.run(static_cast<size_t>(tiling.strips * tiling.rowBlocks), task);
    return failed ? kTERDIT_CPU_OUT_OF_MEMORY : kTERDIT_CPU_OK;
}

template <class I>
int gemmInt8(Gemm const& g, Int8Rows const& a, Parallel const& par)
{
    int64_t const kw4 = (g.k + 15) / 16 * 4; // bytes (= k groups of 4) per weight row
    size_t const panelBytes = static_cast<size_t>(I::kGROUPS) * I::kNS * 4;
    return forEachTask<I>(g, par, I::kMRI, panelBytes,
        [&](int64_t n0, int64_t m0, int64_t m1, uint8_t* panel, uint8_t* accBytes) {
            auto* acc = reinterpret_cast<int32_t*>(accBytes);
            for (int64_t g0 = 0; g0 < kw4; g0 += I::kGROUPS)
            {
                int const groups = static_cast<int>(lesser<int64_t>(I::kGROUPS, kw4 - g0));
                buildInt8Panel<I>(g, kw4, n0, g0, groups, reinterpret_cast<uint32_t*>(panel));
                RowTiles<I, I::kMRI>::int8(panel, a.q + g0 * 4, a.kp, groups, acc, m0, m1);
            }
            int8Epilogue(g, a, acc, I::kNS, m0, m1, n0);
        });
}

template <class I>
int gemmF32(Gemm const& g, Parallel const& par)
{
    int64_t const kw4 = (g.k + 15) / 16 * 4;
    size_t const panelBytes = static_cast<size_t>(I::kKC) * I::kNS * 4;
    return forEachTask<I>(g, par, I::kMRF, panelBytes,
        [&](int64_t n0, int64_t m0, int64_t m1, uint8_t* panelBytesPtr, uint8_t* accBytes) {
            auto* panel = reinterpret_cast<float*>(panelBytesPtr);
            auto* acc = reinterpret_cast<float*>(accBytes);
            for (int64_t k0 = 0; k0 < g.k; k0 += I::kKC)
            {
                int const kc = static_cast<int>(lesser<int64_t>(I::kKC, g.k - k0));
                buildF32Panel<I>(g, kw4, n0, k0, kc, panel);
                RowTiles<I, I::kMRF>::f32(panel, g.x + k0, g.k, kc, acc, m0, m1);
            }
            f32Epilogue(g, acc, I::kNS, m0, m1, n0);
        });
}

//! An ISA unit's entry: the two drivers over I's tiles and the unit's quantizer.
template <class I>
IsaKernels const& entryOf(char const* name, decltype(IsaKernels::quantizeInt8) quantize)
{
    static IsaKernels const kernels{name, &gemmF32<I>, &gemmInt8<I>, quantize};
    return kernels;
}

} // namespace driver
} // namespace
} // namespace cpu
} // namespace terdit
