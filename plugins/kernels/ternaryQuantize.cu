/*
 * Per-token e4m3 quantization of the activations of a W1.58A8 product (launchQuantizeRowsE4m3):
 *
 *   s[m] = max(amax_k |x[m, k]|, 1e-12) / 448,   xq[m, k] = e4m3(x[m, k] / s[m])
 *
 * round to nearest even, saturating (cvt.rn.satfinite); a NaN anywhere in a row makes its s NaN,
 * so the whole token is NaN downstream, as the torch reference (terdit.kernels) defines it.
 * One warp per row, one read for the maximum and one for the conversion (the second hits L1 /
 * L2: a warp's row is at most a few tens of KB); 16-byte loads and 4- / 8-byte stores when the
 * row allows (k % 8 == 0 and 16-byte aligned x and xq), element by element otherwise.
 */
#include "ternaryCommon.cuh"

#include <cuda_fp8.h>

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kQ_WARPS = 8;
constexpr int kQ_MAX_GRID = 65535;

//! NaN-propagating maximum of |values| (fmaxf would drop a NaN).
__device__ __forceinline__ float maxAbs(float m, float v)
{
    float const a = fabsf(v);
    return (a > m || a != a) ? a : m;
}

__device__ __forceinline__ uint16_t toE4m3x2(float lo, float hi)
{
    return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

//! Eight consecutive values of row `x` starting at column c (16-byte aligned vector loads).
template <typename T>
struct Vec8;

template <>
struct Vec8<float>
{
    __device__ static void load(float const* x, float (&v)[8])
    {
        float4 const a = *reinterpret_cast<float4 const*>(x);
        float4 const b = *reinterpret_cast<float4 const*>(x + 4);
        v[0] = a.x;
        v[1] = a.y;
        v[2] = a.z;
        v[3] = a.w;
        v[4] = b.x;
        v[5] = b.y;
        v[6] = b.z;
        v[7] = b.w;
    }
};

template <typename T>
struct Vec8
{
    __device__ static void load(T const* x, float (&v)[8])
    {
        uint4 const a = *reinterpret_cast<uint4 const*>(x);
        T const* e = reinterpret_cast<T const*>(&a);
#pragma unroll
        for (int i = 0; i < 8; ++i)
        {
            v[i] = Elem<T>::toFloat(e[i]);
        }
    }
};

template <typename T>
__global__ void __launch_bounds__(kQ_WARPS * 32) quantizeRowsKernel(
    T const* x, int64_t m, int32_t k, uint8_t* xq, float* xScale, int64_t rowBase, bool vec)
{
    int const lane = threadIdx.x & 31;
    int64_t const row = rowBase + static_cast<int64_t>(blockIdx.x) * kQ_WARPS + (threadIdx.x >> 5);
    if (row >= m)
    {
        return;
    }
    T const* xr = x + row * k;
    uint8_t* qr = xq + row * k;

    float amax = 0.0f;
    if (vec)
    {
        for (int32_t c = lane * 8; c < k; c += 32 * 8)
        {
            float v[8];
            Vec8<T>::load(xr + c, v);
#pragma unroll
            for (int i = 0; i < 8; ++i)
            {
                amax = maxAbs(amax, v[i]);
            }
        }
    }
    else
    {
        for (int32_t c = lane; c < k; c += 32)
        {
            amax = maxAbs(amax, Elem<T>::toFloat(xr[c]));
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        amax = maxAbs(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    }
    // max(amax, 1e-12) that keeps a NaN (the reference's clamp_min does).
    float const s = (amax != amax ? amax : fmaxf(amax, 1e-12f)) / 448.0f;
    if (lane == 0)
    {
        xScale[row] = s;
    }

    if (vec)
    {
        for (int32_t c = lane * 8; c < k; c += 32 * 8)
        {
            float v[8];
            Vec8<T>::load(xr + c, v);
            uint32_t lo = toE4m3x2(v[0] / s, v[1] / s);
            lo |= static_cast<uint32_t>(toE4m3x2(v[2] / s, v[3] / s)) << 16;
            uint32_t hi = toE4m3x2(v[4] / s, v[5] / s);
            hi |= static_cast<uint32_t>(toE4m3x2(v[6] / s, v[7] / s)) << 16;
            *reinterpret_cast<uint2*>(qr + c) = make_uint2(lo, hi);
        }
    }
    else
    {
        for (int32_t c = lane; c < k; c += 32)
        {
            float const v = Elem<T>::toFloat(xr[c]) / s;
            qr[c] = static_cast<uint8_t>(toE4m3x2(v, 0.0f) & 0xFFu);
        }
    }
}

template <typename T>
cudaError_t launchQuantizeT(void const* x, int64_t m, int32_t k, uint8_t* xq, float* xScale, cudaStream_t stream)
{
    bool const vec = k % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15u) == 0
        && (reinterpret_cast<uintptr_t>(xq) & 15u) == 0;
    int64_t const chunk = static_cast<int64_t>(kQ_MAX_GRID) * kQ_WARPS;
    for (int64_t r0 = 0; r0 < m; r0 += chunk)
    {
        int64_t const rows = (m - r0) < chunk ? (m - r0) : chunk;
        unsigned const blocks = static_cast<unsigned>((rows + kQ_WARPS - 1) / kQ_WARPS);
        quantizeRowsKernel<T><<<blocks, kQ_WARPS * 32, 0, stream>>>(
            static_cast<T const*>(x), m, k, xq, xScale, r0, vec);
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

} // namespace
} // namespace kernels

cudaError_t launchQuantizeRowsE4m3(void const* x, DataType dtype, int64_t m, int32_t k, uint8_t* xq, float* xScale,
    cudaStream_t stream)
{
    if (m < 0 || k <= 0 || (m > 0 && (x == nullptr || xq == nullptr || xScale == nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    if (m == 0)
    {
        return cudaSuccess;
    }
    switch (dtype)
    {
    case DataType::kFLOAT: return kernels::launchQuantizeT<float>(x, m, k, xq, xScale, stream);
    case DataType::kHALF: return kernels::launchQuantizeT<__half>(x, m, k, xq, xScale, stream);
    case DataType::kBF16: return kernels::launchQuantizeT<__nv_bfloat16>(x, m, k, xq, xScale, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace terdit
