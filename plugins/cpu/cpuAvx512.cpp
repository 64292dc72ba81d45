/*
 * AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni). int8:
 * vpdpbusd multiplies 4 unsigned codes by 4 signed activation bytes and adds into int32 in one
 * instruction (64 products per zmm); tile 6 rows x 64 columns = 24 accumulators. fp32: the
 * 6 x 64 FMA tile. The quantization is the AVX2 one (every AVX-512 CPU has AVX2).
 */
#include "cpuDriver.h"

#include <immintrin.h>

namespace terdit
{
namespace cpu
{
namespace
{

//! acc += codes . activations: 4 unsigned code bytes times 4 signed activation bytes per int32.
inline void dotBytes(__m512i& acc, __m512i codes, __m512i activations)
{
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(activations));
}

struct Avx512
{
    static constexpr int kMRI = 6; // 24 accumulators + 4 codes + 1 activation of 32 registers
    static constexpr int kMRF = 6;
    static constexpr int kNS = 64;
    static constexpr int kGROUPS = 64;
    static constexpr int kKC = 128;

    // The int8 tile keeps its 24 accumulators in named variables updated in place by asm: with an
    // array of __m512i or the _mm512_dpbusd_epi32 intrinsic, GCC 12 copies every accumulator
    // through the stack on each iteration.
#define TERDIT_ROW_DECLARE(r)                                                                  \
    __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define TERDIT_ROW_DOT(r)                                                                      \
    if constexpr (MR > r)                                                                      \
    {                                                                                          \
        int32_t v;                                                                             \
        std::memcpy(&v, a + r * lda + 4 * j, 4);                                               \
        __m512i const av = _mm512_set1_epi32(v);                                               \
        dotBytes(c##r##0, b0, av);                                        \
        dotBytes(c##r##1, b1, av);                                        \
        dotBytes(c##r##2, b2, av);                                        \
        dotBytes(c##r##3, b3, av);                                        \
    }
#define TERDIT_ROW_STORE(r)                                                                    \
    if constexpr (MR > r)                                                                      \
    {                                                                                          \
        addInto(c + r * kNS, c##r##0);                                                         \
        addInto(c + r * kNS + 16, c##r##1);                                                    \
        addInto(c + r * kNS + 32, c##r##2);                                                    \
        addInto(c + r * kNS + 48, c##r##3);                                                    \
    }

    static void addInto(int32_t* dst, __m512i v)
    {
        _mm512_store_si512(dst, _mm512_add_epi32(_mm512_load_si512(dst), v));
    }

    template <int MR>
    static void int8Tile(uint8_t const* panel, int8_t const* a, int64_t lda, int groups, int32_t* c)
    {
        static_assert(MR >= 1 && MR <= 6, "the tile has 6 rows");
        TERDIT_TILE_ROWS(TERDIT_ROW_DECLARE)
        for (int j = 0; j < groups; ++j)
        {
            __m512i const b0 = _mm512_load_si512(panel + j * 256);
            __m512i const b1 = _mm512_load_si512(panel + j * 256 + 64);
            __m512i const b2 = _mm512_load_si512(panel + j * 256 + 128);
            __m512i const b3 = _mm512_load_si512(panel + j * 256 + 192);
            TERDIT_TILE_ROWS(TERDIT_ROW_DOT)
        }
        TERDIT_TILE_ROWS(TERDIT_ROW_STORE)
    }
#undef TERDIT_ROW_DECLARE
#undef TERDIT_ROW_DOT
#undef TERDIT_ROW_STORE

    template <int MR>
    static void f32Tile(float const* panel, float const* a, int64_t lda, int kc, float* c)
    {
        __m512 acc[MR][4];
        for (int r = 0; r < MR; ++r)
        {
            for (int h = 0; h < 4; ++h)
            {
                acc[r][h] = _mm512_load_ps(c + r * kNS + 16 * h);
            }
        }
        for (int kk = 0; kk < kc; ++kk)
        {
            __m512 b[4];
            for (int h = 0; h < 4; ++h)
            {
                b[h] = _mm512_load_ps(panel + kk * kNS + 16 * h);
            }
            for (int r = 0; r < MR; ++r)
            {
                __m512 const av = _mm512_set1_ps(a[r * lda + kk]);
                for (int h = 0; h < 4; ++h)
                {
                    acc[r][h] = _mm512_fmadd_ps(av, b[h], acc[r][h]);
                }
            }
        }
        for (int r = 0; r < MR; ++r)
        {
            for (int h = 0; h < 4; ++h)
            {
                _mm512_store_ps(c + r * kNS + 16 * h, acc[r][h]);
            }
        }
    }
};

int gemmF32(Gemm const& g, Parallel const& par)
{
    return driver::gemmF32<Avx512>(g, par);
}

int gemmInt8(Gemm const& g, Int8Rows const& a, Parallel const& par)
{
    return driver::gemmInt8<Avx512>(g, a, par);
}

} // namespace

IsaKernels const& avx512Kernels()
{
    static IsaKernels const kernels{"avx512-vnni", gemmF32, gemmInt8, avx2Kernels().quantizeInt8};
    return kernels;
}

} // namespace cpu
} // namespace terdit
