/*
 * Internal interface of the CPU kernels: one call's arguments, the pool interface, and the
 * per-ISA entry points. Each ISA translation unit (cpuAvx2.cpp, cpuAvx512.cpp, cpuPortable.cpp)
 * is compiled with its own -m flags and exports one IsaKernels table; terditCpu.cpp picks one at
 * run time from cpuid.
 */
#pragma once

#include "terditCpu.h"

#include <cstddef>
#include <cstdint>

namespace terdit
{
namespace cpu
{

enum class ActQuant : int32_t
{
    kNONE = 0,
    kINT8 = 1,
    kFP8 = 2,
};

//! One product: Y [m, n] = X [m, k] @ (scale * T)^T + bias, T as k16 codes.
struct Gemm
{
    float const* x;
    int32_t const* w;
    float const* scale;
    float const* bias; // may be null
    float* y;
    int64_t m;
    int64_t n;
    int64_t k;
};

//! The pool a call runs on (ONNX Runtime's, or the library's own).
struct Parallel
{
    TerditCpuParallelFor forEach;
    void* ctx;
    int32_t threads; // how many threads forEach uses (task sizing only)

    template <class F>
    void run(size_t count, F& f) const
    {
        if (count == 0)
        {
            return;
        }
        if (count == 1)
        {
            f(0);
            return;
        }
        forEach(ctx, [](void* arg, size_t i) { (*static_cast<F*>(arg))(i); }, &f, count);
    }
};

//! Quantized rows: int8 [m, kp] (kp = 16 * ceil(k / 16), zero padded), their scale and sum.
struct Int8Rows
{
    int8_t const* q;
    float const* scale;
    int32_t const* sum;
    int64_t kp;
};

struct IsaKernels
{
    char const* name;
    //! Exact mode: fp32 sums.
    int (*gemmF32)(Gemm const& g, Parallel const& par);
    //! int8 mode on quantized rows.
    int (*gemmInt8)(Gemm const& g, Int8Rows const& a, Parallel const& par);
    //! Quantizes rows [r0, r1) of x (the definition: bit-equal on every ISA).
    void (*quantizeInt8)(float const* x, int64_t k, int64_t kp, int64_t r0, int64_t r1, int8_t* q,
        float* scale, int32_t* sum);
};

IsaKernels const& portableKernels();
IsaKernels const& avx2Kernels();
IsaKernels const& avx512Kernels();

//! 64-byte aligned per-thread scratch of at least `bytes`, kept between calls; nullptr when out
//! of memory (terditCpu.cpp: compiled without ISA flags).
void* threadScratch(size_t bytes);

// Quantization constants of the int8 mode (terdit/kernels/int8.py).
constexpr float kINT8_MAX = 127.0F;
constexpr float kMIN_AMAX = 1e-12F;

namespace
{
//! max |x[i]| over a row and whether every value is finite (the scalar scan of the portable
//! quantizer and the fp8 rows).
inline float rowAmax(float const* x, int64_t k, bool& finite)
{
    float amax = 0.0F;
    finite = true;
    for (int64_t i = 0; i < k; ++i)
    {
        float const a = x[i] < 0.0F ? -x[i] : x[i];
        finite = finite && (x[i] - x[i] == 0.0F); // false for NaN and +-Inf
        amax = a > amax ? a : amax;
    }
    return amax;
}

//! Row scale of the int8 mode from the row's amax; NaN for a row holding NaN or Inf.
inline float int8RowScale(float amax, bool finite)
{
    if (!finite)
    {
        return __builtin_nanf("");
    }
    return (amax > kMIN_AMAX ? amax : kMIN_AMAX) / kINT8_MAX;
}
} // namespace

} // namespace cpu
} // namespace terdit
