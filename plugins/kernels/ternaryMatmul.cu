/*
 * TernaryMatMul: size checks, the dispatch table, and the generic (float32 / any alignment) kernel.
 *
 * Dispatch (first matching row wins; README.md has the same table):
 *
 *   | condition                                   | kernel                                 |
 *   |---------------------------------------------|----------------------------------------|
 *   | m == 0                                      | nothing                                |
 *   | dtype float32, or X / Y not 16-byte aligned | generic  (FFMA, fp32, 64x64 tiles)     |
 *   | path forced (params.path / env)             | that kernel (wgmma, wgmma2: sm_90 only, |
 *   |                                             |   else tc)                             |
 *   | m <= 32, or m <= 64 and < 1 tc column block  | skinny   (swap-AB mma.sync, split-K)   |
 *   |   per SM                                    |                                        |
 *   | otherwise                                   | tc       (mma.sync, 4-stage cp.async)  |
 *
 * wgmma and wgmma2 (sm_90a warpgroup MMA) are opt-in (TERDIT_LARGE_M_KERNEL=wgmma | wgmma2) until
 * the GPU bench shows them faster than tc.
 * 16-byte weight loads are used when K % 64 == 0 and W is 16-byte aligned, 4-byte loads otherwise.
 */
#include "ternaryCommon.cuh"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kGEN_TILE = 64;
constexpr int kGEN_BK = 16;
constexpr int kGEN_THREADS = 256;
constexpr int kMAX_GRID_Y = 65535;
static_assert(kGEN_TILE * kGEN_BK % kGEN_THREADS == 0, "X tile loads in whole rounds");

struct GenericArgs
{
    void const* x;
    uint32_t const* w;
    float const* scale;
    float const* bias;
    void* y;
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t kw;
    int32_t halfRows;
    bool swiglu;
};

//! Physical weight row of virtual column v (0..63) of column block cb, or -1 when out of range.
//! SwiGLU: columns 0..31 are gate rows, 32..63 the matching up rows.
__device__ __forceinline__ int32_t genericRow(GenericArgs const& a, int cb, int v)
{
    if (!a.swiglu)
    {
        int32_t const row = cb * kGEN_TILE + v;
        return row < a.n ? row : -1;
    }
    int32_t const col = cb * (kGEN_TILE / 2) + (v & 31);
    if (col >= a.halfRows)
    {
        return -1;
    }
    return v < 32 ? col : a.halfRows + col;
}

//! Plain FFMA tile kernel: 64 tokens x 64 weight rows per CTA, each thread 4 tokens x 4 rows
//! (rows 2tx, 2tx + 1, 2tx + 32, 2tx + 33 so SwiGLU pairs meet in one thread). Exact fp32 math
//! on any alignment; the float32 path of the op and the fallback of the others.
template <typename T>
__global__ void __launch_bounds__(kGEN_THREADS) genericKernel(GenericArgs const a)
{
    __shared__ float sx[kGEN_BK][kGEN_TILE + 4];
    __shared__ float sw[kGEN_BK][kGEN_TILE + 4];

    int const tid = threadIdx.x;
    int const tx = tid & 15;
    int const ty = tid >> 4;
    int const cb = blockIdx.x;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * kGEN_TILE;
    T const* x = static_cast<T const*>(a.x);

    int const vcol[4] = {2 * tx, 2 * tx + 1, 2 * tx + 32, 2 * tx + 33};
    float acc[4][4] = {};

    int32_t wrow = -1;
    if (tid < kGEN_TILE)
    {
        wrow = genericRow(a, cb, tid);
    }

    for (int32_t k0 = 0; k0 < a.k; k0 += kGEN_BK)
    {
#pragma unroll
        for (int it = 0; it < kGEN_TILE * kGEN_BK / kGEN_THREADS; ++it)
        {
            int const idx = tid + it * kGEN_THREADS;
            int const tok = idx / kGEN_BK;
            int const kk = idx % kGEN_BK;
            int64_t const gtok = m0 + tok;
            sx[kk][tok] = gtok < a.m ? Elem<T>::toFloat(x[gtok * a.k + k0 + kk]) : 0.0f;
        }
        if (tid < kGEN_TILE)
        {
            uint32_t const word = wrow >= 0 ? a.w[static_cast<int64_t>(wrow) * a.kw + k0 / 16] : kZERO_WORD;
#pragma unroll
            for (int kk = 0; kk < kGEN_BK; ++kk)
            {
                sw[kk][tid] = static_cast<float>(static_cast<int>((word >> (2 * kk)) & 3u) - 1);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kGEN_BK; ++kk)
        {
            float xv[4];
            float wv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                xv[i] = sx[kk][ty * 4 + i];
                wv[i] = sw[kk][vcol[i]];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
        }
        __syncthreads();
    }

    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int64_t const tok = m0 + ty * 4 + i;
        if (tok >= a.m)
        {
            continue;
        }
        if (!a.swiglu)
        {
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                int32_t const row = genericRow(a, cb, vcol[j]);
                if (row >= 0)
                {
                    float v = acc[i][j] * a.scale[row];
                    if (a.bias != nullptr)
                    {
                        v += a.bias[row];
                    }
                    y[tok * a.n + row] = Elem<T>::fromFloat(v);
                }
            }
        }
        else
        {
#pragma unroll
            for (int j = 0; j < 2; ++j)
            {
                int32_t const gate = genericRow(a, cb, vcol[j]);
                if (gate >= 0)
                {
                    int32_t const up = a.halfRows + gate;
                    float gv = acc[i][j] * a.scale[gate];
                    float uv = acc[i][j + 2] * a.scale[up];
                    if (a.bias != nullptr)
                    {
                        gv += a.bias[gate];
                        uv += a.bias[up];
                    }
                    y[tok * a.halfRows + gate] = Elem<T>::fromFloat(silu(gv) * uv);
                }
            }
        }
    }
}

template <typename T>
cudaError_t launchGenericT(GenericArgs a, int64_t mTotal, cudaStream_t stream)
{
    int64_t const outCols = a.swiglu ? a.halfRows : a.n;
    int const gridX = a.swiglu ? (a.halfRows + kGEN_TILE / 2 - 1) / (kGEN_TILE / 2) : (a.n + kGEN_TILE - 1) / kGEN_TILE;
    int64_t const chunk = static_cast<int64_t>(kMAX_GRID_Y) * kGEN_TILE;
    T const* x0 = static_cast<T const*>(a.x);
    T* y0 = static_cast<T*>(a.y);
    for (int64_t m0 = 0; m0 < mTotal; m0 += chunk)
    {
        int64_t const m = (mTotal - m0) < chunk ? (mTotal - m0) : chunk;
        a.x = x0 + m0 * a.k;
        a.y = y0 + m0 * outCols;
        a.m = static_cast<int32_t>(m);
        dim3 const grid(gridX, static_cast<unsigned>((m + kGEN_TILE - 1) / kGEN_TILE));
        genericKernel<T><<<grid, kGEN_THREADS, 0, stream>>>(a);
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

KernelPath pathFromEnv()
{
    char const* env = std::getenv("TERDIT_KERNEL_PATH");
    if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0)
    {
        return KernelPath::kAUTO;
    }
    if (std::strcmp(env, "skinny") == 0)
    {
        return KernelPath::kSKINNY;
    }
    if (std::strcmp(env, "tc") == 0)
    {
        return KernelPath::kTC;
    }
    if (std::strcmp(env, "generic") == 0)
    {
        return KernelPath::kGENERIC;
    }
    if (std::strcmp(env, "wgmma") == 0)
    {
        return KernelPath::kWGMMA;
    }
    if (std::strcmp(env, "wgmma2") == 0)
    {
        return KernelPath::kWGMMA2;
    }
    if (std::strcmp(env, "skinny2") == 0)
    {
        return KernelPath::kSKINNY2;
    }
    return KernelPath::kAUTO;
}

//! The large-M kernel under kAUTO: wgmma2 by default (tc off sm_90); TERDIT_LARGE_M_KERNEL=tc
//! or =wgmma picks the mma.sync tc kernel or the first sm_90a wgmma kernel instead.
KernelPath largeMFromEnv()
{
    char const* env = std::getenv("TERDIT_LARGE_M_KERNEL");
    if (env != nullptr && std::strcmp(env, "wgmma") == 0)
    {
        return KernelPath::kWGMMA;
    }
    if (env != nullptr && std::strcmp(env, "tc") == 0)
    {
        return KernelPath::kTC;
    }
    // Default: wgmma2 (measured on an H200, 2026-11-26: 1.4-2.5x faster than tc on every
    // M >= 512 TerDiT shape, bench/results/kernels-nvidia-h200-2026-11-26.md); off sm_90 the
    // dispatch below turns it into tc.
    return KernelPath::kWGMMA2;
}

//! The small-M kernel under kAUTO: TERDIT_SMALL_M_KERNEL=skinny2 picks the cp.async-ring variant,
//! anything else (the default) the register-prefetch skinny kernel.
KernelPath smallMFromEnv()
{
    char const* env = std::getenv("TERDIT_SMALL_M_KERNEL");
    return env != nullptr && std::strcmp(env, "skinny2") == 0 ? KernelPath::kSKINNY2 : KernelPath::kSKINNY;
}

//! A device attribute, cached per device (the launcher runs on every call).
template <cudaDeviceAttr kATTR>
int deviceAttribute(int device)
{
    constexpr int kMAX_DEVICES = 64;
    static int cache[kMAX_DEVICES] = {};
    if (device >= 0 && device < kMAX_DEVICES && cache[device] > 0)
    {
        return cache[device];
    }
    int value = 0;
    if (cudaDeviceGetAttribute(&value, kATTR, device) != cudaSuccess || value <= 0)
    {
        value = 1;
    }
    if (device >= 0 && device < kMAX_DEVICES)
    {
        cache[device] = value;
    }
    return value;
}

bool aligned16(void const* p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

thread_local char tReason[256];

} // namespace

cudaError_t launchGeneric(LaunchContext const& ctx, cudaStream_t stream)
{
    TernaryMatmulParams const& p = ctx.p;
    GenericArgs a{};
    fillTileArgs(a, p);
    switch (p.dtype)
    {
    case DataType::kFLOAT: return launchGenericT<float>(a, p.m, stream);
    case DataType::kHALF: return launchGenericT<__half>(a, p.m, stream);
    case DataType::kBF16: return launchGenericT<__nv_bfloat16>(a, p.m, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace kernels

char const* ternaryMatmulCheck(TernaryMatmulParams const& p)
{
    char* const msg = kernels::tReason;
    size_t const size = sizeof(kernels::tReason);
    if (p.m < 0)
    {
        std::snprintf(msg, size, "m=%lld must be >= 0", static_cast<long long>(p.m));
        return msg;
    }
    if (p.n <= 0 || p.n % 16 != 0)
    {
        std::snprintf(msg, size, "n=%d must be a positive multiple of 16 for TernaryMatMul; pad the layer's "
            "output features", p.n);
        return msg;
    }
    if (p.k <= 0 || p.k % 16 != 0)
    {
        std::snprintf(msg, size, "k=%d must be a positive multiple of 16 for TernaryMatMul; pad the layer's "
            "input features", p.k);
        return msg;
    }
    if (p.dtype != DataType::kFLOAT && p.dtype != DataType::kHALF && p.dtype != DataType::kBF16)
    {
        std::snprintf(msg, size, "dtype=%d is not one of 0 (float32), 1 (float16), 2 (bfloat16)",
            static_cast<int>(p.dtype));
        return msg;
    }
    if (p.epilogue != Epilogue::kNONE && p.epilogue != Epilogue::kSWIGLU)
    {
        std::snprintf(msg, size, "epilogue=%d is not one of 0 (none), 1 (swiglu)", static_cast<int>(p.epilogue));
        return msg;
    }
    if (p.epilogue == Epilogue::kSWIGLU && p.n % 32 != 0)
    {
        std::snprintf(msg, size, "n=%d must be a multiple of 32 for the SwiGLU epilogue (w1|w3 halves of a "
            "multiple of 16 each)", p.n);
        return msg;
    }
    if (static_cast<int32_t>(p.path) < 0 || static_cast<int32_t>(p.path) > 6)
    {
        std::snprintf(msg, size, "path=%d is not one of 0 (auto), 1 (skinny), 2 (tc), 3 (generic), 4 (wgmma), "
            "5 (wgmma2), 6 (skinny2)", static_cast<int>(p.path));
        return msg;
    }
    if (p.m > 0 && (p.x == nullptr || p.w == nullptr || p.scale == nullptr || p.y == nullptr))
    {
        std::snprintf(msg, size, "x, w, scale and y must not be null when m=%lld > 0", static_cast<long long>(p.m));
        return msg;
    }
    return nullptr;
}

cudaError_t launchTernaryMatmul(TernaryMatmulParams const& params, cudaStream_t stream)
{
    if (ternaryMatmulCheck(params) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (params.m == 0)
    {
        return cudaSuccess;
    }
    int device = 0;
    cudaError_t const err = cudaGetDevice(&device);
    if (err != cudaSuccess)
    {
        return err;
    }
    kernels::LaunchContext ctx{params, kernels::deviceAttribute<cudaDevAttrMultiProcessorCount>(device), false,
        kernels::deviceAttribute<cudaDevAttrComputeCapabilityMajor>(device)};
    ctx.vecW = params.k % 64 == 0 && kernels::aligned16(params.w);

    KernelPath path = params.path == KernelPath::kAUTO ? kernels::pathFromEnv() : params.path;
    if (params.dtype == DataType::kFLOAT || !kernels::aligned16(params.x) || !kernels::aligned16(params.y))
    {
        path = KernelPath::kGENERIC;
    }
    else if (path == KernelPath::kAUTO)
    {
        // Up to 2 x 32 tokens, two skinny launches beat tc when tc's 128-feature column blocks
        // would leave SMs idle (narrow layers).
        int64_t const colBlocks = (static_cast<int64_t>(params.n) + 127) / 128; // SwiGLU: (n / 2) / 64 blocks
        bool const skinny = params.m <= kernels::kSKINNY_MAX_M
            || (params.m <= 2 * kernels::kSKINNY_MAX_M && colBlocks < ctx.numSMs);
        path = skinny ? kernels::smallMFromEnv() : kernels::largeMFromEnv();
    }
    if ((path == KernelPath::kWGMMA || path == KernelPath::kWGMMA2) && ctx.ccMajor != 9)
    {
        path = KernelPath::kTC; // the wgmma kernels are built for sm_90a only
    }
    switch (path)
    {
    case KernelPath::kSKINNY: return kernels::launchSkinny(ctx, stream);
    case KernelPath::kSKINNY2: return kernels::launchSkinny(ctx, stream, true);
    case KernelPath::kTC: return kernels::launchTensorCore(ctx, stream);
    case KernelPath::kWGMMA: return kernels::launchWgmma(ctx, stream);
    case KernelPath::kWGMMA2: return kernels::launchWgmma2(ctx, stream);
    default: return kernels::launchGeneric(ctx, stream);
    }
}

} // namespace terdit
