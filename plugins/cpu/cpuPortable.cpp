/*
 * Portable C++ kernels (any CPU, ARM included; no intrinsics): one weight row decoded at a
 * time, then dot products. Correct, not fast: the fallback when no vector ISA of this library
 * is available, and the plain statement of what the vector kernels compute.
 */
#include "cpuDriver.h"

#include <cmath>
#include <vector>

namespace terdit
{
namespace cpu
{
namespace
{

constexpr int64_t kROWS_PER_TASK = 16;

void quantizeInt8(float const* x, int64_t k, int64_t kp, int64_t r0, int64_t r1, int8_t* q, float* scale,
    int32_t* sum)
{
    for (int64_t r = r0; r < r1; ++r)
    {
        float const* xr = x + r * k;
        int8_t* qr = q + r * kp;
        bool finite = true;
        float const s = int8RowScale(rowAmax(xr, k, finite), finite);
        scale[r] = s;
        int32_t total = 0;
        for (int64_t i = 0; i < kp; ++i)
        {
            int32_t v = 0;
            if (finite && i < k)
            {
                v = static_cast<int32_t>(std::nearbyint(xr[i] / s));
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
            }
            qr[i] = static_cast<int8_t>(v);
            total += v;
        }
        sum[r] = total;
    }
}

//! Codes c - 1 of weight row n as int8 [k].
void decodeRow(Gemm const& g, int64_t n, int8_t* t)
{
    int64_t const words = (g.k + 15) / 16;
    int32_t const* row = g.w + n * words;
    for (int64_t kk = 0; kk < g.k; ++kk)
    {
        auto const word = static_cast<uint32_t>(row[kk / 16]);
        t[kk] = static_cast<int8_t>(static_cast<int32_t>((word >> (2 * (kk % 16))) & 3U) - 1);
    }
}

template <class Row>
int forRowStrips(Gemm const& g, Parallel const& par, Row const& row)
{
    int64_t const tasks = (g.n + kROWS_PER_TASK - 1) / kROWS_PER_TASK;
    auto task = [&](size_t index) {
        std::vector<int8_t> t(static_cast<size_t>(g.k));
        int64_t const n1 = std::min(g.n, static_cast<int64_t>(index + 1) * kROWS_PER_TASK);
        for (int64_t n = static_cast<int64_t>(index) * kROWS_PER_TASK; n < n1; ++n)
        {
            decodeRow(g, n, t.data());
            row(n, t.data());
        }
    };
    par.run(static_cast<size_t>(tasks), task);
    return kTERDIT_CPU_OK;
}

int gemmF32(Gemm const& g, Parallel const& par)
{
    return forRowStrips(g, par, [&](int64_t n, int8_t const* t) {
        for (int64_t m = 0; m < g.m; ++m)
        {
            float const* xr = g.x + m * g.k;
            float acc = 0.0F;
            for (int64_t kk = 0; kk < g.k; ++kk)
            {
                acc += xr[kk] * static_cast<float>(t[kk]);
            }
            float const y = acc * g.scale[n];
            g.y[m * g.n + n] = g.bias != nullptr ? y + g.bias[n] : y;
        }
    });
}

int gemmInt8(Gemm const& g, Int8Rows const& a, Parallel const& par)
{
    return forRowStrips(g, par, [&](int64_t n, int8_t const* t) {
        for (int64_t m = 0; m < g.m; ++m)
        {
            int8_t const* qr = a.q + m * a.kp;
            int32_t acc = 0;
            for (int64_t kk = 0; kk < g.k; ++kk)
            {
                acc += static_cast<int32_t>(qr[kk]) * t[kk];
            }
            float const y = static_cast<float>(acc) * a.scale[m] * g.scale[n];
            g.y[m * g.n + n] = g.bias != nullptr ? y + g.bias[n] : y;
        }
    });
}

} // namespace

IsaKernels const& portableKernels()
{
    static IsaKernels const kernels{"portable", gemmF32, gemmInt8, quantizeInt8};
    return kernels;
}

} // namespace cpu
} // namespace terdit
