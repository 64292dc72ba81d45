/*
 * Large-M TernaryMatMul on Hopper ("wgmma", sm_90a): warpgroup MMA with the decoded ternary
 * weight in registers.
 *
 * Swap-AB, like the skinny kernel: D^T = T X^T with wgmma.mma_async m64n128k16, A = weights
 * (64 output features per instruction, decoded from 2-bit codes straight into the A register
 * fragment, which per warp is the mma.m16n8k16 A layout), B = X^T read by the tensor cores from
 * shared memory (128 tokens x 64 columns per stage, K-major, the canonical 128-byte swizzle).
 * - CTA: 2 warpgroups x MW m64 tiles -> 128 * MW features x 128 tokens; fp32 accumulators.
 * - 4-stage cp.async pipeline (X tile 16 KB + W tile 2 KB * MW per stage); each thread fences its
 *   copies into the async proxy before the barrier that hands a stage to the tensor cores.
 * - Per 64-column k tile a warpgroup decodes all its A fragments first, issues 4 * MW wgmmas,
 *   commits and waits for them before the registers are reused (the A registers and accumulators
 *   of an in-flight wgmma must not be touched); the two warpgroups overlap each other's decode.
 * - SwiGLU: each warp's 16 rows are 8 gate rows and the 8 matching up rows, so the gate is
 *   applied on the accumulators (rows g and g + 8 of the fragment).
 * The sm_80 build of this file holds an empty kernel; the dispatcher only picks it on sm_90.
 */
#include "ternaryCommon.cuh"

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kWG_THREADS = 256;
constexpr int kWG_TOKENS = 128; //!< tokens per CTA (the wgmma N)
constexpr int kWG_BK = 64;
constexpr int kWG_STAGES = 4;
constexpr int kWG_MAX_GRID_Y = 65535;
static_assert(kWG_TOKENS * 8 % kWG_THREADS == 0 && 128 * 4 % kWG_THREADS == 0,
    "stage loads assume whole rounds of the CTA's threads");

struct WgArgs
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
    bool vecW;
};

template <int MW>
__host__ __device__ constexpr int wgFeatures()
{
    return 128 * MW;
}

template <int MW>
__host__ __device__ constexpr int wgStageBytes()
{
    return kWG_TOKENS * kWG_BK * 2 + wgFeatures<MW>() * 16; // multiple of 1024
}

template <int MW>
__host__ __device__ constexpr int wgSmemBytes()
{
    return kWG_STAGES * wgStageBytes<MW>() + 1024; // + slack to align the base to 1024 bytes
}

//! Physical weight row of CTA row sr, or -1. SwiGLU: rows 0-7 of each 16-row unit are gate rows,
//! rows 8-15 the matching up rows.
template <int MW>
__device__ __forceinline__ int32_t wgPhysRow(WgArgs const& a, int fb, int sr)
{
    if (!a.swiglu)
    {
        int32_t const row = fb * wgFeatures<MW>() + sr;
        return row < a.n ? row : -1;
    }
    int32_t const col = fb * (wgFeatures<MW>() / 2) + (sr >> 4) * 8 + (sr & 7);
    if (col >= a.halfRows)
    {
        return -1;
    }
    return (sr & 8) ? a.halfRows + col : col;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
//! Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t descSw128(uint32_t smemAddr)
{
    uint64_t desc = static_cast<uint64_t>((smemAddr & 0x3FFFFu) >> 4); // start address
    desc |= static_cast<uint64_t>(1) << 16;                          // leading offset (unused here)
    desc |= static_cast<uint64_t>(1024 >> 4) << 32;                  // stride offset
    desc |= static_cast<uint64_t>(1) << 62;                          // 128-byte swizzle
    return desc;
}
#endif

template <typename T, int MW>
__device__ __forceinline__ void wgLoadStage(WgArgs const& a, uint32_t stage, int64_t m0, int fb, int kt)
{
    T const* x = static_cast<T const*>(a.x);
    uint32_t const sw = stage + kWG_TOKENS * kWG_BK * 2;
    int const tid = threadIdx.x;

    // X: 128 token rows x 8 chunks of 16 bytes; chunk c of row r lands at chunk c ^ (r & 7) of the
    // row, which is the 128-byte swizzle of a 1024-byte aligned tile.
#pragma unroll
    for (int it = 0; it < kWG_TOKENS * 8 / kWG_THREADS; ++it)
    {
        int const idx = tid + it * kWG_THREADS;
        int const row = idx >> 3;
        int const chunk = idx & 7;
        int64_t const tok = m0 + row;
        int32_t const col = kt * kWG_BK + chunk * 8;
        bool const ok = tok < a.m && col < a.k;
        T const* src = ok ? x + tok * a.k + col : x;
        cpAsync16(stage + row * 128 + ((chunk ^ (row & 7)) << 4), src, ok ? 16u : 0u);
    }

    int32_t const word0 = kt * (kWG_BK / 16);
    if (a.vecW)
    {
        // One 16-byte copy per weight row (128 or 256 rows, 256 threads).
        for (int sr = tid; sr < wgFeatures<MW>(); sr += kWG_THREADS)
        {
            int32_t const row = wgPhysRow<MW>(a, fb, sr);
            bool const ok = row >= 0 && word0 < a.kw;
            uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 : a.w;
            cpAsync16(sw + sr * 16, src, ok ? 16u : 0u);
        }
    }
    else
    {
#pragma unroll
        for (int it = 0; it < wgFeatures<MW>() * 4 / kWG_THREADS; ++it)
        {
            int const idx = tid + it * kWG_THREADS;
            int const sr = idx >> 2;
            int const q = idx & 3;
            int32_t const row = wgPhysRow<MW>(a, fb, sr);
            bool const ok = row >= 0 && word0 + q < a.kw;
            uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 + q : a.w;
            cpAsync4(sw + sr * 16 + q * 4, src, ok ? 4u : 0u);
        }
    }
}

template <typename T, int MW>
__global__ void __launch_bounds__(kWG_THREADS, 1) wgKernel(WgArgs const a)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ char smemRaw[];
    uint32_t const smemBase = (smemAddress(smemRaw) + 1023u) & ~1023u;
    char* const smemGeneric = smemRaw + (smemBase - smemAddress(smemRaw));

    int const wg = threadIdx.x >> 7;
    int const warp = (threadIdx.x >> 5) & 3;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int const fb = blockIdx.x;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * kWG_TOKENS;
    int const kTiles = (a.k + kWG_BK - 1) / kWG_BK;

    float acc[MW][64];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int i = 0; i < 64; ++i)
            acc[mw][i] = 0.0f;

#pragma unroll
    for (int s = 0; s < kWG_STAGES - 1; ++s)
    {
        if (s < kTiles)
        {
            wgLoadStage<T, MW>(a, smemBase + s * wgStageBytes<MW>(), m0, fb, s);
        }
        cpAsyncCommit();
    }

    for (int kt = 0; kt < kTiles; ++kt)
    {
        cpAsyncWait<kWG_STAGES - 2>();
        fenceProxyAsync();
        // Stage kt is complete for every thread, and every warpgroup waited for its wgmmas of
        // iteration kt - 1, so that stage may be refilled.
        __syncthreads();
        int const next = kt + kWG_STAGES - 1;
        if (next < kTiles)
        {
            wgLoadStage<T, MW>(a, smemBase + (next % kWG_STAGES) * wgStageBytes<MW>(), m0, fb, next);
        }
        cpAsyncCommit();

        int const stage = kt % kWG_STAGES;
        uint32_t const sx = smemBase + stage * wgStageBytes<MW>();
        char const* swGeneric = smemGeneric + stage * wgStageBytes<MW>() + kWG_TOKENS * kWG_BK * 2;

        // A fragments of the whole k tile: [mw][kk][reg]. Row g / g + 8 of this warp's 16 rows;
        // word kk of a row holds columns 16 kk .. 16 kk + 15 of the tile.
        uint32_t af[MW][4][4];
#pragma unroll
        for (int mw = 0; mw < MW; ++mw)
        {
            int const sr = wg * 64 * MW + mw * 64 + warp * 16 + g;
            uint4 const lo = *reinterpret_cast<uint4 const*>(swGeneric + sr * 16);
            uint4 const hi = *reinterpret_cast<uint4 const*>(swGeneric + (sr + 8) * 16);
            uint32_t const wlo[4] = {lo.x, lo.y, lo.z, lo.w};
            uint32_t const whi[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
            {
                af[mw][kk][0] = decodeAdjacentPair<T>(wlo[kk] >> (4 * t));      // row g, cols 2t..
                af[mw][kk][1] = decodeAdjacentPair<T>(whi[kk] >> (4 * t));      // row g + 8
                af[mw][kk][2] = decodeAdjacentPair<T>(wlo[kk] >> (4 * t + 16)); // row g, cols 2t + 8..
                af[mw][kk][3] = decodeAdjacentPair<T>(whi[kk] >> (4 * t + 16)); // row g + 8
            }
        }

#pragma unroll
        for (int mw = 0; mw < MW; ++mw)
#pragma unroll
            for (int i = 0; i < 64; ++i)
                pin(acc[mw][i]);
        wgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
        {
            // B = 128 tokens x 16 columns starting 32 bytes into each 128-byte row.
            uint64_t const desc = descSw128(sx + kk * 32);
#pragma unroll
            for (int mw = 0; mw < MW; ++mw)
            {
                wgmmaM64N128K16<T>(acc[mw], af[mw][kk][0], af[mw][kk][1], af[mw][kk][2], af[mw][kk][3], desc);
            }
        }
        wgmmaCommit();
        wgmmaWaitAll();
#pragma unroll
        for (int mw = 0; mw < MW; ++mw)
        {
#pragma unroll
            for (int i = 0; i < 64; ++i)
                pin(acc[mw][i]);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    pin(af[mw][kk][r]);
        }
    }
    cpAsyncWait<0>();

    // Accumulator element 4j + e: feature row g (+8 for e >= 2) of the warp's 16, token
    // 8j + 2t + (e & 1).
    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
    {
        int const unit = wg * 4 * MW + mw * 4 + warp; // 16-row unit of the CTA
        if (!a.swiglu)
        {
            int32_t const f0 = fb * wgFeatures<MW>() + unit * 16 + g;
            int32_t const f1 = f0 + 8;
            bool const ok0 = f0 < a.n;
            bool const ok1 = f1 < a.n;
            float const s0 = ok0 ? a.scale[f0] : 0.0f;
            float const s1 = ok1 ? a.scale[f1] : 0.0f;
            float const b0 = (ok0 && a.bias != nullptr) ? a.bias[f0] : 0.0f;
            float const b1 = (ok1 && a.bias != nullptr) ? a.bias[f1] : 0.0f;
#pragma unroll
            for (int j = 0; j < 16; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                {
                    int64_t const tok = m0 + j * 8 + 2 * t + e;
                    if (tok < a.m)
                    {
                        if (ok0)
                        {
                            y[tok * a.n + f0] = Elem<T>::fromFloat(acc[mw][4 * j + e] * s0 + b0);
                        }
                        if (ok1)
                        {
                            y[tok * a.n + f1] = Elem<T>::fromFloat(acc[mw][4 * j + 2 + e] * s1 + b1);
                        }
                    }
                }
        }
        else
        {
            int32_t const col = fb * (wgFeatures<MW>() / 2) + unit * 8 + g;
            if (col < a.halfRows)
            {
                int32_t const up = a.halfRows + col;
                float const sg = a.scale[col];
                float const su = a.scale[up];
                float const bg = a.bias != nullptr ? a.bias[col] : 0.0f;
                float const bu = a.bias != nullptr ? a.bias[up] : 0.0f;
#pragma unroll
                for (int j = 0; j < 16; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                    {
                        int64_t const tok = m0 + j * 8 + 2 * t + e;
                        if (tok < a.m)
                        {
                            float const gv = acc[mw][4 * j + e] * sg + bg;
                            float const uv = acc[mw][4 * j + 2 + e] * su + bu;
                            y[tok * a.halfRows + col] = Elem<T>::fromFloat(silu(gv) * uv);
                        }
                    }
            }
        }
    }
#endif
}

template <typename T, int MW>
cudaError_t launchWgT(WgArgs a, int64_t mTotal, cudaStream_t stream)
{
    constexpr int smem = wgSmemBytes<MW>();
    constexpr int kMAX_DEVICES = 64;
    static bool configured[kMAX_DEVICES] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
    {
        return err;
    }
    if (device < 0 || device >= kMAX_DEVICES || !configured[device])
    {
        err = cudaFuncSetAttribute(wgKernel<T, MW>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (err != cudaSuccess)
        {
            return err;
        }
        if (device >= 0 && device < kMAX_DEVICES)
        {
            configured[device] = true;
        }
    }
    constexpr int features = wgFeatures<MW>();
    int64_t const outCols = a.swiglu ? a.halfRows : a.n;
    int const gridX = a.swiglu ? (a.halfRows + features / 2 - 1) / (features / 2) : (a.n + features - 1) / features;
    int64_t const chunk = static_cast<int64_t>(kWG_MAX_GRID_Y) * kWG_TOKENS;
    char const* x0 = static_cast<char const*>(a.x);
    char* y0 = static_cast<char*>(a.y);
    for (int64_t m0 = 0; m0 < mTotal; m0 += chunk)
    {
        int64_t const m = (mTotal - m0) < chunk ? (mTotal - m0) : chunk;
        a.x = x0 + m0 * a.k * 2;
        a.y = y0 + m0 * outCols * 2;
        a.m = static_cast<int32_t>(m);
        dim3 const grid(gridX, static_cast<unsigned>((m + kWG_TOKENS - 1) / kWG_TOKENS));
        wgKernel<T, MW><<<grid, kWG_THREADS, smem, stream>>>(a);
        err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

} // namespace

cudaError_t launchWgmma(LaunchContext const& ctx, cudaStream_t stream)
{
    TernaryMatmulParams const& p = ctx.p;
    WgArgs a{};
    fillTileArgs(a, p);
    a.vecW = ctx.vecW;

    // Dispatch table: 256 features per CTA (MW = 2) when that still gives every SM a CTA, else 128.
    int64_t const tokenBlocks = (p.m + kWG_TOKENS - 1) / kWG_TOKENS;
    int64_t const wideBlocks = a.swiglu ? (a.halfRows + 127) / 128 : (a.n + 255) / 256;
    bool const wide = wideBlocks * tokenBlocks >= ctx.numSMs;
    if (p.dtype == DataType::kBF16)
    {
        return wide ? launchWgT<__nv_bfloat16, 2>(a, p.m, stream) : launchWgT<__nv_bfloat16, 1>(a, p.m, stream);
    }
    return wide ? launchWgT<__half, 2>(a, p.m, stream) : launchWgT<__half, 1>(a, p.m, stream);
}

} // namespace kernels
} // namespace terdit
