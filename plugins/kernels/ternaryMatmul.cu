/*
 * TernaryMatMul: size checks, the dispatch table, and the generic (float32 / any alignment /
 * e4m3 on GPUs without FP8 tensor cores) kernel.
 *
 * Dispatch (first matching row wins; README.md has the same table). "fp8" = ActQuant::kFP8E4M3,
 * "FP8 MMA" = compute capability >= 8.9, "vecW" = W rows 16-byte aligned (K % 64 == 0):
 *
 *   | condition                                                   | kernel                         |
 *   |-------------------------------------------------------------|--------------------------------|
 *   | m == 0                                                      | nothing                        |
 *   | X / Y not 16-byte aligned; float32 X; fp8 without FP8 MMA   | generic (FFMA, fp32, 64 x 64)  |
 *   | path forced                                                 | that kernel, then the rules    |
 *   |                                                             |   below the table              |
 *   | fp8                                                         | wgmma (sm_90, vecW), else tc   |
 *   | m <= 32, or m <= 64 and fewer 128-row column blocks than SMs | skinny (swap-AB mma.sync)      |
 *   | sm_90 and vecW                                              | wgmma (TMA + mbarrier ring)    |
 *   | otherwise                                                   | tc (mma.sync, cp.async ring)   |
 *
 * A forced or chosen wgmma / wgmma2 runs tc off sm_90, wgmma without vecW runs tc, wgmma2 with
 * fp8 runs wgmma, skinny with fp8 runs tc (the e4m3 kernels are wgmma, tc and generic).
 */
#include "ternaryCommon.cuh"

#include <cstdio>

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
    int64_t m;     //!< all tokens
    int64_t mBase; //!< first token of this launch (launches are split at 65535 row blocks)
    int32_t n;
    int32_t k;
    int32_t kw;
    EpilogueOp ep;
};

//! Physical weight row of virtual column v (0..63) of column block cb, or -1 when out of range.
//! SwiGLU: columns 0..31 are gate rows, 32..63 the matching up rows.
__device__ __forceinline__ int32_t genericRow(GenericArgs const& a, int cb, int v)
{
    if (!a.ep.swiglu)
    {
        int32_t const row = cb * kGEN_TILE + v;
        return row < a.n ? row : -1;
    }
    int32_t const col = cb * (kGEN_TILE / 2) + (v & 31);
    if (col >= a.ep.halfRows)
    {
        return -1;
    }
    return v < 32 ? col : a.ep.halfRows + col;
}

template <typename TX>
__device__ __forceinline__ float loadX(TX const* x, int64_t i)
{
    return Elem<TX>::toFloat(x[i]);
}

template <>
__device__ __forceinline__ float loadX<E4m3>(E4m3 const* x, int64_t i)
{
    return e4m3ToFloat(x[i].bits);
}

//! Plain FFMA tile kernel: 64 tokens x 64 weight rows per CTA, each thread 4 tokens x 4 rows
//! (rows 2tx, 2tx + 1, 2tx + 32, 2tx + 33 so SwiGLU pairs meet in one thread). Exact fp32 math
//! on any alignment; the float32 path of the op, the fallback of the others, and the e4m3 path
//! of GPUs without FP8 tensor cores (the decoded activations are exact in fp32).
template <typename TX>
__global__ void __launch_bounds__(kGEN_THREADS) genericKernel(GenericArgs const a)
{
    __shared__ float sx[kGEN_BK][kGEN_TILE + 4];
    __shared__ float sw[kGEN_BK][kGEN_TILE + 4];

    int const tid = threadIdx.x;
    int const tx = tid & 15;
    int const ty = tid >> 4;
    int const cb = blockIdx.x;
    int64_t const m0 = a.mBase + static_cast<int64_t>(blockIdx.y) * kGEN_TILE;
    TX const* x = static_cast<TX const*>(a.x);

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
            sx[kk][tok] = gtok < a.m ? loadX(x, gtok * a.k + k0 + kk) : 0.0f;
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

#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int64_t const tok = m0 + ty * 4 + i;
        if (tok >= a.m)
        {
            continue;
        }
        float const ts = a.ep.tokenScale(tok);
        if (!a.ep.swiglu)
        {
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                int32_t const row = genericRow(a, cb, vcol[j]);
                if (row >= 0)
                {
                    a.ep.storeFeature(tok, row, acc[i][j], ts);
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
                    a.ep.storeSwiglu(tok, gate, acc[i][j], acc[i][j + 2], ts);
                }
            }
        }
    }
}

template <typename TX>
cudaError_t launchGenericT(GenericArgs a, cudaStream_t stream)
{
    int const gridX = a.ep.swiglu ? (a.ep.halfRows + kGEN_TILE / 2 - 1) / (kGEN_TILE / 2)
                                  : (a.n + kGEN_TILE - 1) / kGEN_TILE;
    int64_t const chunk = static_cast<int64_t>(kMAX_GRID_Y) * kGEN_TILE;
    for (int64_t m0 = 0; m0 < a.m; m0 += chunk)
    {
        int64_t const m = (a.m - m0) < chunk ? (a.m - m0) : chunk;
        a.mBase = m0;
        dim3 const grid(gridX, static_cast<unsigned>((m + kGEN_TILE - 1) / kGEN_TILE));
        genericKernel<TX><<<grid, kGEN_THREADS, 0, stream>>>(a);
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

//! A device attribute, cached per device (the launcher runs on every call).
template <cudaDeviceAttr kATTR>
int deviceAttribute(int device)
{
    constexpr int kMAX_DEVICES = 64;
    static int cache[kMAX_DEVICES] = {};
    if (device >= 0 && device < kMAX_DEVICES && cache[device] > 0)
    {
        return cache[device] - 1;
    }
    int value = 0;
    if (cudaDeviceGetAttribute(&value, kATTR, device) != cudaSuccess || value < 0)
    {
        value = 0;
    }
    if (device >= 0 && device < kMAX_DEVICES)
    {
        cache[device] = value + 1; // + 1: 0 means "not read yet" (a minor version can be 0)
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
    recordKernelPath(KernelPath::kGENERIC);
    TernaryMatmulParams const& p = ctx.p;
    GenericArgs a{};
    a.x = p.x;
    a.w = reinterpret_cast<uint32_t const*>(p.w);
    a.m = p.m;
    a.n = p.n;
    a.k = p.k;
    a.kw = p.k / 16;
    a.ep = makeEpilogue(p);
    if (p.actQuant == ActQuant::kFP8E4M3)
    {
        return launchGenericT<E4m3>(a, stream);
    }
    switch (p.dtype)
    {
    case DataType::kFLOAT: return launchGenericT<float>(a, stream);
    case DataType::kHALF: return launchGenericT<__half>(a, stream);
    case DataType::kBF16: return launchGenericT<__nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}

namespace
{
//! What lastKernelPath() returns, per host thread.
thread_local KernelPath tLastKernelPath = KernelPath::kAUTO;
} // namespace

void recordKernelPath(KernelPath path) noexcept
{
    tLastKernelPath = path;
}

} // namespace kernels

KernelPath lastKernelPath() noexcept
{
    return kernels::tLastKernelPath;
}

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
    if (static_cast<int32_t>(p.path) < 0 || static_cast<int32_t>(p.path) > 5)
    {
        std::snprintf(msg, size, "path=%d is not one of 0 (auto), 1 (skinny), 2 (tc), 3 (generic), 4 (wgmma), "
            "5 (wgmma2)", static_cast<int>(p.path));
        return msg;
    }
    if (p.actQuant != ActQuant::kNONE && p.actQuant != ActQuant::kFP8E4M3)
    {
        std::snprintf(msg, size, "actQuant=%d is not one of 0 (none), 1 (fp8 e4m3)", static_cast<int>(p.actQuant));
        return msg;
    }
    if (p.m > 0 && (p.x == nullptr || p.w == nullptr || p.scale == nullptr || p.y == nullptr))
    {
        std::snprintf(msg, size, "x, w, scale and y must not be null when m=%lld > 0", static_cast<long long>(p.m));
        return msg;
    }
    if (p.m > 0 && p.actQuant == ActQuant::kFP8E4M3 && p.xScale == nullptr)
    {
        std::snprintf(msg, size, "xScale must not be null with actQuant=1 (fp8 e4m3) when m=%lld > 0; quantize X "
            "with launchQuantizeRowsE4m3", static_cast<long long>(p.m));
        return msg;
    }
    return nullptr;
}

cudaError_t launchTernaryMatmul(TernaryMatmulParams const& params, cudaStream_t stream)
{
    kernels::recordKernelPath(KernelPath::kAUTO); // until a family's launcher records itself
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
        kernels::deviceAttribute<cudaDevAttrComputeCapabilityMajor>(device),
        kernels::deviceAttribute<cudaDevAttrComputeCapabilityMinor>(device)};
    ctx.numSMs = ctx.numSMs > 0 ? ctx.numSMs : 1;
    ctx.vecW = params.k % 64 == 0 && kernels::aligned16(params.w);
    bool const fp8 = params.actQuant == ActQuant::kFP8E4M3;
    bool const fp8Mma = ctx.ccMajor > 8 || (ctx.ccMajor == 8 && ctx.ccMinor >= 9);
    bool const hopper = ctx.ccMajor == 9;

    KernelPath path = params.path;
    if (!kernels::aligned16(params.x) || !kernels::aligned16(params.y) || (!fp8 && params.dtype == DataType::kFLOAT)
        || (fp8 && !fp8Mma))
    {
        path = KernelPath::kGENERIC;
    }
    else if (path == KernelPath::kAUTO)
    {
        // Up to 2 x 32 tokens, two skinny launches beat the tiled kernels when their 128-row
        // column blocks would leave SMs idle (narrow layers).
        int64_t const colBlocks = (static_cast<int64_t>(params.n) + 127) / 128; // SwiGLU: (n / 2) / 64 blocks
        bool const skinny = params.m <= kernels::kSKINNY_MAX_M
            || (params.m <= 2 * kernels::kSKINNY_MAX_M && colBlocks < ctx.numSMs);
        path = (skinny && !fp8) ? KernelPath::kSKINNY : KernelPath::kWGMMA;
    }
    if (path == KernelPath::kWGMMA2 && fp8)
    {
        path = KernelPath::kWGMMA;
    }
    if ((path == KernelPath::kWGMMA || path == KernelPath::kWGMMA2) && !hopper)
    {
        path = KernelPath::kTC; // the wgmma kernels are built for sm_90a only
    }
    if (path == KernelPath::kWGMMA && !ctx.vecW)
    {
        path = KernelPath::kTC; // TMA needs 16-byte weight row strides
    }
    if (path == KernelPath::kSKINNY && fp8)
    {
        path = KernelPath::kTC;
    }
    switch (path)
    {
    case KernelPath::kSKINNY: return kernels::launchSkinny(ctx, stream);
    case KernelPath::kTC: return kernels::launchTensorCore(ctx, stream);
    case KernelPath::kWGMMA: return kernels::launchWgmma(ctx, stream);
    case KernelPath::kWGMMA2: return kernels::launchWgmma2(ctx, stream);
    default: return kernels::launchGeneric(ctx, stream);
    }
}

} // namespace terdit
