/*
 * Large-M TernaryMatMul ("tc"): a tiled tensor-core GEMM, Y tile = BM tokens x 128 features.
 *
 * - 8 warps as 2 (tokens) x 4 (features); warp tile (BM / 2) x 32; mma.sync m16n8k16, fp32
 *   accumulators. X is the A operand (ldmatrix.x4 from shared memory), the decoded ternary weight
 *   the B operand.
 * - A 4-stage cp.async pipeline over 64-column k tiles: X tile BM x 64 (128 bytes a row, 16-byte
 *   chunks XOR-swizzled by row so ldmatrix is conflict-free) and W tile 128 rows x 4 words
 *   (16 bytes a row: the 8 rows one ldmatrix-phase touches are 128 contiguous bytes).
 * - The weights stay 2-bit in shared memory; each lane decodes the two codes it feeds an MMA
 *   (nibbles t and t + 4 of its row's word) into registers. Nothing decoded ever goes to memory.
 * - SwiGLU: a CTA owns 64 gate rows and the 64 matching up rows (warp n-tiles 0-1 gate, 2-3 up),
 *   so the gate is applied on the accumulators.
 */
#include "ternaryCommon.cuh"

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kTC_THREADS = 256;
constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kSTAGES = 4;
constexpr int kMAX_GRID_Y = 65535;
static_assert(64 * 8 % kTC_THREADS == 0 && kBN * 4 % kTC_THREADS == 0 && kBN <= kTC_THREADS,
    "stage loads assume whole rounds of the CTA's threads");

struct TcArgs
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

template <int BM>
__host__ __device__ constexpr int stageBytes()
{
    return BM * kBK * 2 + kBN * 16;
}

//! Physical weight row of shared-memory row sr (0..127) of CTA column-block `cb`, or -1.
__device__ __forceinline__ int32_t tcPhysRow(TcArgs const& a, int cb, int sr)
{
    if (!a.swiglu)
    {
        int32_t const row = cb * kBN + sr;
        return row < a.n ? row : -1;
    }
    int const warpN = sr >> 5;
    int const jj = (sr >> 3) & 3;
    int const i = sr & 7;
    int32_t const col = cb * (kBN / 2) + warpN * 16 + (jj & 1) * 8 + i;
    if (col >= a.halfRows)
    {
        return -1;
    }
    return jj < 2 ? col : a.halfRows + col;
}

template <typename T, int BM>
__device__ __forceinline__ void tcLoadStage(TcArgs const& a, char* stage, int64_t m0, int cb, int kt)
{
    T const* x = static_cast<T const*>(a.x);
    uint32_t const sx = smemAddress(stage);
    uint32_t const sw = sx + BM * kBK * 2;
    int const tid = threadIdx.x;

    // X: BM rows x 8 chunks of 16 bytes.
#pragma unroll
    for (int it = 0; it < BM * 8 / kTC_THREADS; ++it)
    {
        int const idx = tid + it * kTC_THREADS;
        int const row = idx >> 3;
        int const chunk = idx & 7;
        int64_t const tok = m0 + row;
        int32_t const col = kt * kBK + chunk * 8;
        bool const ok = tok < a.m && col < a.k;
        T const* src = ok ? x + tok * a.k + col : x;
        cpAsync16(sx + row * 128 + ((chunk ^ (row & 7)) << 4), src, ok ? 16u : 0u);
    }

    // W: 128 rows x 4 words. Zero-filled words decode to -1, but the matching X columns are
    // zero-filled too (k tail) or the row is never stored (n tail).
    int32_t const word0 = kt * (kBK / 16);
    if (a.vecW)
    {
        if (tid < kBN)
        {
            int32_t const row = tcPhysRow(a, cb, tid);
            bool const ok = row >= 0 && word0 < a.kw;
            uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 : a.w;
            cpAsync16(sw + tid * 16, src, ok ? 16u : 0u);
        }
    }
    else
    {
#pragma unroll
        for (int it = 0; it < kBN * 4 / kTC_THREADS; ++it)
        {
            int const idx = tid + it * kTC_THREADS;
            int const sr = idx >> 2;
            int const q = idx & 3;
            int32_t const row = tcPhysRow(a, cb, sr);
            bool const ok = row >= 0 && word0 + q < a.kw;
            uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 + q : a.w;
            cpAsync4(sw + sr * 16 + q * 4, src, ok ? 4u : 0u);
        }
    }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kTC_THREADS, 1) tcKernel(TcArgs const a)
{
    constexpr int MI = BM / 32; // m16 tiles per warp
    constexpr int NJ = 4;       // n8 tiles per warp
    extern __shared__ __align__(128) char smem[];

    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int const warpM = warp >> 2;
    int const warpN = warp & 3;
    int const cb = blockIdx.x;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * BM;
    int const kTiles = (a.k + kBK - 1) / kBK;

    float acc[MI][NJ][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[mi][nj][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < kSTAGES - 1; ++s)
    {
        if (s < kTiles)
        {
            tcLoadStage<T, BM>(a, smem + s * stageBytes<BM>(), m0, cb, s);
        }
        cpAsyncCommit();
    }

    // ldmatrix.x4 lane roles: matrix q = lane / 8 covers rows (q & 1) * 8 + lane % 8 of the m16
    // tile and the 8-column chunk q / 2 of the k16 step -> registers a0..a3 of the MMA.
    int const lq = lane >> 3;
    int const lrow = (lq & 1) * 8 + (lane & 7);
    int const lchunk = lq >> 1;

    for (int kt = 0; kt < kTiles; ++kt)
    {
        cpAsyncWait<kSTAGES - 2>();
        __syncthreads(); // stage kt landed for all threads; stage kt - 1 is free to refill
        int const next = kt + kSTAGES - 1;
        if (next < kTiles)
        {
            tcLoadStage<T, BM>(a, smem + (next % kSTAGES) * stageBytes<BM>(), m0, cb, next);
        }
        cpAsyncCommit();

        char const* stage = smem + (kt % kSTAGES) * stageBytes<BM>();
        uint32_t const sx = smemAddress(stage);
        uint4 wq[NJ]; // words 0..3 of this lane's row g in each n8 tile
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj)
        {
            wq[nj] = *reinterpret_cast<uint4 const*>(stage + BM * kBK * 2 + (warpN * 32 + nj * 8 + g) * 16);
        }

#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk)
        {
            uint32_t af[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
            {
                int const row = warpM * (BM / 2) + mi * 16 + lrow;
                int const chunk = kk * 2 + lchunk;
                ldmatrixX4(af[mi], sx + row * 128 + ((chunk ^ (row & 7)) << 4));
            }
            uint32_t bf[NJ][2];
#pragma unroll
            for (int nj = 0; nj < NJ; ++nj)
            {
                uint32_t const word = kk == 0 ? wq[nj].x : (kk == 1 ? wq[nj].y : (kk == 2 ? wq[nj].z : wq[nj].w));
                // b0: columns 2t, 2t + 1 (nibble t); b1: columns 2t + 8, 2t + 9 (nibble t + 4).
                bf[nj][0] = decodeAdjacentPair<T>(word >> (4 * t));
                bf[nj][1] = decodeAdjacentPair<T>(word >> (4 * t + 16));
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int nj = 0; nj < NJ; ++nj)
                    mma16816<T>(acc[mi][nj], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[nj][0], bf[nj][1]);
        }
    }
    cpAsyncWait<0>();

    // Epilogue straight from the accumulators: lane holds tokens g, g + 8 and features 2t, 2t + 1
    // of each (m16, n8) tile.
    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
        {
            int64_t const tok = m0 + warpM * (BM / 2) + mi * 16 + g + h * 8;
            if (tok >= a.m)
            {
                continue;
            }
            if (!a.swiglu)
            {
#pragma unroll
                for (int nj = 0; nj < NJ; ++nj)
                {
                    int32_t const col = cb * kBN + warpN * 32 + nj * 8 + 2 * t;
                    if (col < a.n)
                    {
                        float v0 = acc[mi][nj][2 * h] * a.scale[col];
                        float v1 = acc[mi][nj][2 * h + 1] * a.scale[col + 1];
                        if (a.bias != nullptr)
                        {
                            v0 += a.bias[col];
                            v1 += a.bias[col + 1];
                        }
                        *reinterpret_cast<uint32_t*>(y + tok * a.n + col) = Elem<T>::pack2(v0, v1);
                    }
                }
            }
            else
            {
#pragma unroll
                for (int nj = 0; nj < 2; ++nj)
                {
                    int32_t const col = cb * (kBN / 2) + warpN * 16 + nj * 8 + 2 * t;
                    if (col < a.halfRows)
                    {
                        int32_t const up = a.halfRows + col;
                        float g0 = acc[mi][nj][2 * h] * a.scale[col];
                        float g1 = acc[mi][nj][2 * h + 1] * a.scale[col + 1];
                        float u0 = acc[mi][nj + 2][2 * h] * a.scale[up];
                        float u1 = acc[mi][nj + 2][2 * h + 1] * a.scale[up + 1];
                        if (a.bias != nullptr)
                        {
                            g0 += a.bias[col];
                            g1 += a.bias[col + 1];
                            u0 += a.bias[up];
                            u1 += a.bias[up + 1];
                        }
                        *reinterpret_cast<uint32_t*>(y + tok * a.halfRows + col)
                            = Elem<T>::pack2(silu(g0) * u0, silu(g1) * u1);
                    }
                }
            }
        }
}

template <typename T, int BM>
cudaError_t launchTcT(TcArgs a, int64_t mTotal, size_t elem, cudaStream_t stream)
{
    constexpr int smem = kSTAGES * stageBytes<BM>();
    // Opt in to more than 48 KB of dynamic shared memory, once per device (the attribute is per
    // device; doing it once keeps the call out of CUDA-graph captures after a warm-up launch).
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
        err = cudaFuncSetAttribute(tcKernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (err != cudaSuccess)
        {
            return err;
        }
        if (device >= 0 && device < kMAX_DEVICES)
        {
            configured[device] = true;
        }
    }
    int64_t const outCols = a.swiglu ? a.halfRows : a.n;
    int const gridX = a.swiglu ? (a.halfRows + kBN / 2 - 1) / (kBN / 2) : (a.n + kBN - 1) / kBN;
    int64_t const chunk = static_cast<int64_t>(kMAX_GRID_Y) * BM;
    char const* x0 = static_cast<char const*>(a.x);
    char* y0 = static_cast<char*>(a.y);
    for (int64_t m0 = 0; m0 < mTotal; m0 += chunk)
    {
        int64_t const m = (mTotal - m0) < chunk ? (mTotal - m0) : chunk;
        a.x = x0 + m0 * a.k * elem;
        a.y = y0 + m0 * outCols * elem;
        a.m = static_cast<int32_t>(m);
        dim3 const grid(gridX, static_cast<unsigned>((m + BM - 1) / BM));
        tcKernel<T, BM><<<grid, kTC_THREADS, smem, stream>>>(a);
        err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

} // namespace

cudaError_t launchTensorCore(LaunchContext const& ctx, cudaStream_t stream)
{
    TernaryMatmulParams const& p = ctx.p;
    TcArgs a{};
    fillTileArgs(a, p);
    a.vecW = ctx.vecW;

    // Dispatch table: BM = 64 while 128-token tiles would leave SMs idle, else BM = 128.
    int64_t const colBlocks = a.swiglu ? (a.halfRows + kBN / 2 - 1) / (kBN / 2) : (a.n + kBN - 1) / kBN;
    bool const small = colBlocks * ((p.m + 127) / 128) < 2 * ctx.numSMs;
    if (p.dtype == DataType::kBF16)
    {
        return small ? launchTcT<__nv_bfloat16, 64>(a, p.m, 2, stream) : launchTcT<__nv_bfloat16, 128>(a, p.m, 2, stream);
    }
    return small ? launchTcT<__half, 64>(a, p.m, 2, stream) : launchTcT<__half, 128>(a, p.m, 2, stream);
}

} // namespace kernels
} // namespace terdit
