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

struct Avx512
{
    static constexpr int kMRI = 6; // 24 accumulators + 4 codes + 1 activation of 32 registers
    static constexpr int kMRF = 6;
    static constexpr int kNS = 64;
    static constexpr int kGROUPS = 64;
    static constexpr int kKC = 128;
    static constexpr int kACC = 16; // int32 outputs per accumulator

    // The int8 tile keeps its 24 accumulators in named variables updated in place by asm
    // (cpuDriver.h's tile rows): with an array of __m512i or the _mm512_dpbusd_epi32 intrinsic,
    // GCC 12 copies every accumulator through the stack on each iteration.
    using Acc = __m512i;

    static __m512i splat(int32_t v)
    {
        return _mm512_set1_epi32(v);
    }

    static __m512i loadCodes(uint8_t const* p)
    {
        return _mm512_load_si512(p);
    }

    //! acc += codes . activations: 4 unsigned code bytes times 4 signed activation bytes per int32.
    static void dot(__m512i& acc, __m512i codes, __m512i activations)
    {
        asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(activations));
    }

    static void flushInto(int32_t* dst, __m512i v)
    {
        _mm512_store_si512(dst, _mm512_add_epi32(_mm512_load_si512(dst), v));
    }

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

} // namespace

IsaKernels const& avx512Kernels()
{
    return driver::entryOf<Avx512>("avx512-vnni", avx2Kernels().quantizeInt8);
}

} // namespace cpu
} // namespace terdit
