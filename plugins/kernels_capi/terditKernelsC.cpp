/*
 * C ABI of libterdit_kernels.so for ctypes (terdit/kernels/cuda.py). Only the functions below are
 * exported (version script terditKernels.map); the library depends on glibc and a static cudart,
 * so a build made on a machine without a GPU loads under any torch / CUDA 13 driver.
 */
#include "ternaryMatmul.h"

#include <cstdint>
#include <cuda_runtime_api.h>

#define TERDIT_C_API extern "C" __attribute__((visibility("default")))

namespace
{

terdit::TernaryMatmulParams makeParams(void const* x, int32_t const* w, float const* scale, float const* bias,
    void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, int32_t path,
    float const* xScale = nullptr)
{
    terdit::TernaryMatmulParams p;
    p.x = x;
    p.w = w;
    p.scale = scale;
    p.bias = bias;
    p.y = y;
    p.m = m;
    p.n = n;
    p.k = k;
    p.dtype = static_cast<terdit::DataType>(dtype);
    p.epilogue = static_cast<terdit::Epilogue>(epilogue);
    p.path = static_cast<terdit::KernelPath>(path);
    if (xScale != nullptr)
    {
        p.actQuant = terdit::ActQuant::kFP8E4M3;
        p.xScale = xScale;
    }
    return p;
}

} // namespace

//! Y = X @ (scale * T)^T + bias (epilogue 1: SwiGLU over w1|w3). Returns the cudaError_t value.
TERDIT_C_API int terditTernaryMatmulEx(void const* x, int32_t const* w, float const* scale, float const* bias,
    void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, int32_t path, void* stream)
{
    terdit::TernaryMatmulParams const p = makeParams(x, w, scale, bias, y, m, n, k, dtype, epilogue, path);
    return static_cast<int>(terdit::launchTernaryMatmul(p, static_cast<cudaStream_t>(stream)));
}

//! Same with the automatic kernel choice.
TERDIT_C_API int terditTernaryMatmul(void const* x, int32_t const* w, float const* scale, float const* bias,
    void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, void* stream)
{
    return terditTernaryMatmulEx(x, w, scale, bias, y, m, n, k, dtype, epilogue, 0, stream);
}

//! Why these arguments are rejected, or nullptr when they are valid (the string lives until the
//! calling thread's next call).
TERDIT_C_API char const* terditCheck(void const* x, int32_t const* w, float const* scale, float const* bias,
    void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, int32_t path)
{
    return terdit::ternaryMatmulCheck(makeParams(x, w, scale, bias, y, m, n, k, dtype, epilogue, path));
}

//! W1.58A8: Y = (e4m3(X) @ T^T) * xScale[m] * scale[n] + bias (epilogue 1: SwiGLU) with X given as
//! e4m3 bytes [m, k] and its per-token scales [m] (terditQuantizeRowsE4m3); `dtype` is Y's type.
TERDIT_C_API int terditTernaryMatmulE4m3(void const* xq, float const* xScale, int32_t const* w, float const* scale,
    float const* bias, void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, int32_t path,
    void* stream)
{
    terdit::TernaryMatmulParams p = makeParams(xq, w, scale, bias, y, m, n, k, dtype, epilogue, path, xScale);
    p.actQuant = terdit::ActQuant::kFP8E4M3; // also when xScale is null: the check names it
    return static_cast<int>(terdit::launchTernaryMatmul(p, static_cast<cudaStream_t>(stream)));
}

//! Why the W1.58A8 arguments are rejected, or nullptr.
TERDIT_C_API char const* terditCheckE4m3(void const* xq, float const* xScale, int32_t const* w, float const* scale,
    float const* bias, void* y, int64_t m, int32_t n, int32_t k, int32_t dtype, int32_t epilogue, int32_t path)
{
    terdit::TernaryMatmulParams p = makeParams(xq, w, scale, bias, y, m, n, k, dtype, epilogue, path, xScale);
    p.actQuant = terdit::ActQuant::kFP8E4M3;
    return terdit::ternaryMatmulCheck(p);
}

//! Per-token e4m3 quantization of x [m, k] (`dtype`) into xq [m, k] bytes and xScale [m].
TERDIT_C_API int terditQuantizeRowsE4m3(void const* x, int32_t dtype, int64_t m, int32_t k, void* xq, float* xScale,
    void* stream)
{
    return static_cast<int>(terdit::launchQuantizeRowsE4m3(x, static_cast<terdit::DataType>(dtype), m, k,
        static_cast<uint8_t*>(xq), xScale, static_cast<cudaStream_t>(stream)));
}

//! cudaGetErrorString of a value returned above.
TERDIT_C_API char const* terditErrorString(int error)
{
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}

//! The kernel family the calling host thread's last product ran (a KernelPath value; 0: none yet),
//! so a test asserts the family it claims to cover (the dispatcher falls back silently).
TERDIT_C_API int terditLastKernelPath()
{
    return static_cast<int>(terdit::lastKernelPath());
}

//! Version of the C ABI (bumped on any signature change; 2: W1.58A8 entry points, path 6 removed;
//! 3: terditLastKernelPath).
TERDIT_C_API int terditKernelsAbiVersion()
{
    return 3;
}
