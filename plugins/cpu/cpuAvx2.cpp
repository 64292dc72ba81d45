/*
 * AVX2 + FMA kernels (compiled with -mavx2 -mfma). int8: vpmaddubsw multiplies the unsigned
 * codes by the signed activation bytes into int16 pairs; the pairs are summed in int16 for up to
 * 64 groups of 4 (|pair| <= 2 * 2 * 127 = 508, 64 * 508 < 32767), then widened once with
 * vpmaddwd: one multiply per 32 products instead of two. fp32: the 6 x 16 FMA tile.
 */
#include "cpuDriver.h"

#include <immintrin.h>

namespace terdit
{
namespace cpu
{
namespace
{

struct Avx2
{
    static constexpr int kMRI = 6; // 12 int16 accumulators + 2 codes + 1 activation + 1 product
    static constexpr int kMRF = 6; // the 6 x 16 FMA tile: 12 accumulators
    static constexpr int kNS = 16;
    static constexpr int kGROUPS = 64;
    static constexpr int kKC = 256;
    static constexpr int kACC = 8; // int32 outputs per accumulator (16 int16 pairs widened)

    // Named accumulators updated in place by asm (cpuDriver.h's tile rows): with an array of
    // __m256i GCC 12 adds a register copy per accumulator per iteration and spills beyond 4 rows.
    using Acc = __m256i;

    static __m256i splat(int32_t v)
    {
        return _mm256_set1_epi32(v);
    }

    static __m256i loadCodes(uint8_t const* p)
    {
        return _mm256_load_si256(reinterpret_cast<__m256i const*>(p));
    }

    //! acc (int16) += pairwise sums of codes (u8) x activations (s8).
    static void dot(__m256i& acc, __m256i codes, __m256i activations)
    {
        __m256i t;
        asm("vpmaddubsw %3, %2, %1\n\tvpaddw %1, %0, %0"
            : "+x"(acc), "=&x"(t)
            : "x"(codes), "x"(activations));
    }

    //! dst (int32 x 8) += the pairs of acc summed.
    static void flushInto(int32_t* dst, __m256i acc)
    {
        __m256i const wide = _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
        auto* p = reinterpret_cast<__m256i*>(dst);
        _mm256_store_si256(p, _mm256_add_epi32(_mm256_load_si256(p), wide));
    }

    template <int MR>
    static void f32Tile(float const* panel, float const* a, int64_t lda, int kc, float* c)
    {
        __m256 acc[MR][2];
        for (int r = 0; r < MR; ++r)
        {
            acc[r][0] = _mm256_load_ps(c + r * kNS);
            acc[r][1] = _mm256_load_ps(c + r * kNS + 8);
        }
        for (int kk = 0; kk < kc; ++kk)
        {
            __m256 const b0 = _mm256_load_ps(panel + kk * kNS);
            __m256 const b1 = _mm256_load_ps(panel + kk * kNS + 8);
            for (int r = 0; r < MR; ++r)
            {
                __m256 const av = _mm256_broadcast_ss(a + r * lda + kk);
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
        }
        for (int r = 0; r < MR; ++r)
        {
            _mm256_store_ps(c + r * kNS, acc[r][0]);
            _mm256_store_ps(c + r * kNS + 8, acc[r][1]);
        }
    }
};

//! The definition's quantization, 8 columns at a time: amax, s = max(amax, 1e-12) / 127,
//! round-half-even(x / s) (cvtps2dq under the default rounding mode), the row sum.
void quantizeInt8(float const* x, int64_t k, int64_t kp, int64_t r0, int64_t r1, int8_t* q, float* scale,
    int32_t* sum)
{
    __m256 const absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t r = r0; r < r1; ++r)
    {
        float const* xr = x + r * k;
        int8_t* qr = q + r * kp;
        __m256 vmax = _mm256_setzero_ps();
        __m256 bad = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8)
        {
            __m256 const v = _mm256_loadu_ps(xr + i);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absMask));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, vmax);
        float amax = 0.0F;
        for (float l : lanes)
        {
            amax = l > amax ? l : amax;
        }
        bool finite = _mm256_movemask_ps(bad) == 0;
        for (int64_t j = i; j < k; ++j)
        {
            float const a = xr[j] < 0 ? -xr[j] : xr[j];
            finite = finite && (xr[j] - xr[j] == 0.0F);
            amax = a > amax ? a : amax;
        }
        float const s = int8RowScale(amax, finite);
        scale[r] = s;
        if (!finite)
        {
            std::memset(qr, 0, static_cast<size_t>(kp));
            sum[r] = 0;
            continue;
        }
        __m256 const vs = _mm256_set1_ps(s);
        __m256i vsum = _mm256_setzero_si256();
        i = 0;
        for (; i + 8 <= k; i += 8)
        {
            __m256i const v = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xr + i), vs));
            vsum = _mm256_add_epi32(vsum, v);
            __m128i const p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + i), _mm_packs_epi16(p16, p16));
        }
        alignas(32) int32_t parts[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(parts), vsum);
        int32_t total = 0;
        for (int32_t p : parts)
        {
            total += p;
        }
        for (; i < k; ++i)
        {
            auto const v = static_cast<int32_t>(__builtin_nearbyintf(xr[i] / s));
            qr[i] = static_cast<int8_t>(v);
            total += v;
        }
        for (; i < kp; ++i)
        {
            qr[i] = 0;
        }
        sum[r] = total;
    }
}

} // namespace

IsaKernels const& avx2Kernels()
{
    return driver::entryOf<Avx2>("avx2", quantizeInt8);
}

} // namespace cpu
} // namespace terdit
