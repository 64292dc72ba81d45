/*
 * Large-M TernaryMatMul ("tc"): a tiled tensor-core GEMM, Y tile = BM tokens x 128 features; the
 * large-M path off Hopper (sm_80 / sm_86 bf16 / fp16; sm_89 also W1.58A8).
 *
 * - 8 warps as 2 (tokens) x 4 (features); warp tile (BM / 2) x 32; mma.sync with fp32
 *   accumulators: m16n8k16 for bf16 / fp16 X, m16n8k32 e4m3 for W1.58A8 (sm_89+). X is the A
 *   operand (ldmatrix.x4 from shared memory), the decoded ternary weight the B operand.
 * - A 4-stage cp.async pipeline over k tiles of 128 bytes of X per row (64 bf16 / fp16 columns,
 *   128 e4m3 columns): X tile BM x 128 bytes (16-byte chunks XOR-swizzled by row so ldmatrix is
 *   conflict-free) and W tile 128 rows x 16 or 32 bytes (the codes of those columns).
 * - The weights stay 2-bit in shared memory; each lane decodes the codes it feeds an MMA into
 *   registers (decodeAdjacentPair for 16-bit operands, decodeE4m3Quads for e4m3). The 8-bit
 *   m16n8k32 A fragment is byte for byte the 16-bit m16n8k16 one, so ldmatrix serves both.
 * - SwiGLU: a CTA owns 64 gate rows and the 64 matching up rows (warp n-tiles 0-1 gate, 2-3 up),
 *   so the gate is applied on the accumulators.
 */
#include "ternaryCommon.cuh"

#include <type_traits>

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kTC_THREADS = 256;
constexpr int kBN = 128;
constexpr int kSTAGES = 4;
constexpr int kMAX_GRID_Y = 65535;
constexpr int kX_ROW_BYTES = 128; //!< X bytes per row and k tile
static_assert(64 * 8 % kTC_THREADS == 0 && kBN <= kTC_THREADS, "stage loads in whole rounds of the CTA");

//! Operand traits: columns per k tile, weight bytes per row and k tile, MMA k step.
template <typename Op>
struct TcOp
{
    static constexpr int kBK = 64;      //!< 16-bit X: 64 columns = 128 bytes
    static constexpr int kW_BYTES = 16; //!< 4 k16 words
    static constexpr int kELEM = 2;
};

template <>
struct TcOp<E4m3>
{
    static constexpr int kBK = 128;
    static constexpr int kW_BYTES = 32; //!< 8 k16 words
    static constexpr int kELEM = 1;
};

static_assert(TcOp<E4m3>::kBK * TcOp<E4m3>::kELEM == kX_ROW_BYTES && TcOp<__half>::kBK * TcOp<__half>::kELEM
        == kX_ROW_BYTES, "a k tile is one 128-byte row of X per token");

struct TcArgs
{
    void const* x;
    uint32_t const* w;
    EpilogueOp ep; //!< y / xScale point at this launch's first token
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t kw;
    uint32_t magic0; //!< DecodeMagics::m0 of the 16-bit type (in a register, not an immediate)
    bool vecW;
};

template <typename Op, int BM>
__host__ __device__ constexpr int stageBytes()
{
    return BM * kX_ROW_BYTES + kBN * TcOp<Op>::kW_BYTES;
}

//! Physical weight row of shared-memory row sr (0..127) of CTA column-block `cb`, or -1.
__device__ __forceinline__ int32_t tcPhysRow(TcArgs const& a, int cb, int sr)
{
    if (!a.ep.swiglu)
    {
        int32_t const row = cb * kBN + sr;
        return row < a.n ? row : -1;
    }
    int const warpN = sr >> 5;
    int const jj = (sr >> 3) & 3;
    int const i = sr & 7;
    int32_t const col = cb * (kBN / 2) + warpN * 16 + (jj & 1) * 8 + i;
    if (col >= a.ep.halfRows)
    {
        return -1;
    }
    return jj < 2 ? col : a.ep.halfRows + col;
}

template <typename Op, int BM>
__device__ __forceinline__ void tcLoadStage(TcArgs const& a, char* stage, int64_t m0, int cb, int kt)
{
    using Traits = TcOp<Op>;
    char const* x = static_cast<char const*>(a.x);
    uint32_t const sx = smemAddress(stage);
    uint32_t const sw = sx + BM * kX_ROW_BYTES;
    int const tid = threadIdx.x;

    // X: BM rows x 8 chunks of 16 bytes. K % 16 == 0, so a chunk is all in or all out of range.
#pragma unroll
    for (int it = 0; it < BM * 8 / kTC_THREADS; ++it)
    {
        int const idx = tid + it * kTC_THREADS;
        int const row = idx >> 3;
        int const chunk = idx & 7;
        int64_t const tok = m0 + row;
        int32_t const col = kt * Traits::kBK + chunk * (16 / Traits::kELEM);
        bool const ok = tok < a.m && col < a.k;
        char const* src = ok ? x + (tok * a.k + col) * Traits::kELEM : x;
        cpAsync16(sx + row * kX_ROW_BYTES + ((chunk ^ (row & 7)) << 4), src, ok ? 16u : 0u);
    }

    // W: 128 rows x kW_BYTES. Zero-filled words decode to -1, but the matching X columns are
    // zero-filled too (k tail) or the row is never stored (n tail).
    int32_t const word0 = kt * (Traits::kBK / 16);
    constexpr int kQUADS = Traits::kW_BYTES / 16; // 16-byte copies per row
    if (a.vecW)
    {
#pragma unroll
        for (int it = 0; it < (kBN * kQUADS + kTC_THREADS - 1) / kTC_THREADS; ++it)
        {
            int const idx = tid + it * kTC_THREADS;
            if (idx < kBN * kQUADS)
            {
                int const sr = idx / kQUADS;
                int const q = idx % kQUADS;
                int32_t const row = tcPhysRow(a, cb, sr);
                // K % 64 == 0: a 4-word quad is all in or all out of range.
                bool const ok = row >= 0 && word0 + 4 * q < a.kw;
                uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 + 4 * q : a.w;
                cpAsync16(sw + sr * Traits::kW_BYTES + q * 16, src, ok ? 16u : 0u);
            }
        }
    }
    else
    {
        constexpr int kWORDS = Traits::kW_BYTES / 4;
#pragma unroll
        for (int it = 0; it < kBN * kWORDS / kTC_THREADS; ++it)
        {
            int const idx = tid + it * kTC_THREADS;
            int const sr = idx / kWORDS;
            int const q = idx % kWORDS;
            int32_t const row = tcPhysRow(a, cb, sr);
            bool const ok = row >= 0 && word0 + q < a.kw;
            uint32_t const* src = ok ? a.w + static_cast<int64_t>(row) * a.kw + word0 + q : a.w;
            cpAsync4(sw + sr * Traits::kW_BYTES + q * 4, src, ok ? 4u : 0u);
        }
    }
}

//! The B fragments of k step kk for one n8 tile, and its MMA with each m16 A tile.
template <typename Op, int MI, int NJ>
struct TcStep
{
    //! 16-bit operands: b0 = columns 2t, 2t + 1 (nibble t of word kk), b1 = columns 2t + 8, 2t + 9.
    __device__ __forceinline__ static void run(float (&acc)[MI][NJ][4], int nj, uint32_t const (&af)[MI][4],
        char const* wRow, int kk, int t, uint32_t magic0, uint32_t, uint32_t)
    {
        uint32_t const word = *reinterpret_cast<uint32_t const*>(wRow + kk * 4);
        uint32_t const b0 = decodeAdjacentPair<Op>(word >> (4 * t), magic0);
        uint32_t const b1 = decodeAdjacentPair<Op>(word >> (4 * t + 16), magic0);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
        {
            mma16816<Op>(acc[mi][nj], af[mi][0], af[mi][1], af[mi][2], af[mi][3], b0, b1);
        }
    }
};

template <int MI, int NJ>
struct TcStep<E4m3, MI, NJ>
{
    //! e4m3: b0 = columns 4t .. 4t + 3 (byte t of word 2kk), b1 = columns 16 + 4t .. (word 2kk + 1).
    __device__ __forceinline__ static void run(float (&acc)[MI][NJ][4], int nj, uint32_t const (&af)[MI][4],
        char const* wRow, int kk, int, uint32_t, uint32_t sel, uint32_t lut)
    {
        uint2 const words = *reinterpret_cast<uint2 const*>(wRow + kk * 8);
        uint32_t b0;
        uint32_t b1;
        decodeE4m3Quads(words.x, words.y, sel, lut, b0, b1);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
        {
            mma16832E4m3(acc[mi][nj], af[mi][0], af[mi][1], af[mi][2], af[mi][3], b0, b1);
        }
    }
};

template <typename Op, int BM>
__global__ void __launch_bounds__(kTC_THREADS, 1) tcKernel(TcArgs const a)
{
#if defined(TERDIT_FP8_MMA) || !defined(__CUDA_ARCH__)
    constexpr bool kBUILT = true;
#else
    constexpr bool kBUILT = !std::is_same<Op, E4m3>::value; // e4m3 mma.sync needs sm_89+
#endif
    if constexpr (kBUILT)
    {
        using Traits = TcOp<Op>;
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
        int const kTiles = (a.k + Traits::kBK - 1) / Traits::kBK;
        uint32_t const magic0 = a.magic0;
        uint32_t const sel = quadSelector(t);
        uint32_t const lut = kE4M3_LUT;

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
                tcLoadStage<Op, BM>(a, smem + s * stageBytes<Op, BM>(), m0, cb, s);
            }
            cpAsyncCommit();
        }

        // ldmatrix.x4 lane roles: matrix q = lane / 8 covers rows (q & 1) * 8 + lane % 8 of the m16
        // tile and the 16-byte chunk q / 2 of the k step -> registers a0..a3 of the MMA.
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
                tcLoadStage<Op, BM>(a, smem + (next % kSTAGES) * stageBytes<Op, BM>(), m0, cb, next);
            }
            cpAsyncCommit();

            char const* stage = smem + (kt % kSTAGES) * stageBytes<Op, BM>();
            uint32_t const sx = smemAddress(stage);
            char const* sw = stage + BM * kX_ROW_BYTES;

#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
            {
                uint32_t af[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                {
                    int const row = warpM * (BM / 2) + mi * 16 + lrow;
                    int const chunk = kk * 2 + lchunk;
                    ldmatrixX4(af[mi], sx + row * kX_ROW_BYTES + ((chunk ^ (row & 7)) << 4));
                }
#pragma unroll
                for (int nj = 0; nj < NJ; ++nj)
                {
                    TcStep<Op, MI, NJ>::run(
                        acc, nj, af, sw + (warpN * 32 + nj * 8 + g) * Traits::kW_BYTES, kk, t, magic0, sel, lut);
                }
            }
        }
        cpAsyncWait<0>();

        // Epilogue straight from the accumulators: lane holds tokens g, g + 8 and features 2t, 2t + 1
        // of each (m16, n8) tile.
        EpilogueOp const& ep = a.ep;
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
                float const ts = ep.tokenScale(tok);
                if (!ep.swiglu)
                {
#pragma unroll
                    for (int nj = 0; nj < NJ; ++nj)
                    {
                        int32_t const col = cb * kBN + warpN * 32 + nj * 8 + 2 * t;
                        if (col < a.n)
                        {
                            ep.storePair(tok, col,
                                EpilogueOp::finish(acc[mi][nj][2 * h], ts, ep.featureScale(col), ep.featureBias(col)),
                                EpilogueOp::finish(
                                    acc[mi][nj][2 * h + 1], ts, ep.featureScale(col + 1), ep.featureBias(col + 1)));
                        }
                    }
                }
                else
                {
#pragma unroll
                    for (int nj = 0; nj < 2; ++nj)
                    {
                        int32_t const col = cb * (kBN / 2) + warpN * 16 + nj * 8 + 2 * t;
                        if (col < ep.halfRows)
                        {
                            int32_t const up = ep.halfRows + col;
                            float const g0 = EpilogueOp::finish(
                                acc[mi][nj][2 * h], ts, ep.featureScale(col), ep.featureBias(col));
                            float const g1 = EpilogueOp::finish(
                                acc[mi][nj][2 * h + 1], ts, ep.featureScale(col + 1), ep.featureBias(col + 1));
                            float const u0 = EpilogueOp::finish(
                                acc[mi][nj + 2][2 * h], ts, ep.featureScale(up), ep.featureBias(up));
                            float const u1 = EpilogueOp::finish(
                                acc[mi][nj + 2][2 * h + 1], ts, ep.featureScale(up + 1), ep.featureBias(up + 1));
                            ep.storePair(tok, col, silu(g0) * u0, silu(g1) * u1);
                        }
                    }
                }
            }
    }
}

template <typename Op, int BM>
cudaError_t launchTcT(TcArgs a, int64_t mTotal, int64_t yElem, cudaStream_t stream)
{
    constexpr int smem = kSTAGES * stageBytes<Op, BM>();
    cudaError_t err = configureSmem<tcKernel<Op, BM>>(smem);
    if (err != cudaSuccess)
    {
        return err;
    }
    int const gridX = a.ep.swiglu ? (a.ep.halfRows + kBN / 2 - 1) / (kBN / 2) : (a.n + kBN - 1) / kBN;
    int64_t const chunk = static_cast<int64_t>(kMAX_GRID_Y) * BM;
    char const* x0 = static_cast<char const*>(a.x);
    char* y0 = static_cast<char*>(a.ep.y);
    float const* s0 = a.ep.xScale;
    for (int64_t m0 = 0; m0 < mTotal; m0 += chunk)
    {
        int64_t const m = (mTotal - m0) < chunk ? (mTotal - m0) : chunk;
        a.x = x0 + m0 * a.k * TcOp<Op>::kELEM;
        a.ep.y = y0 + m0 * a.ep.ldy * yElem;
        a.ep.xScale = s0 != nullptr ? s0 + m0 : nullptr;
        a.m = static_cast<int32_t>(m);
        dim3 const grid(gridX, static_cast<unsigned>((m + BM - 1) / BM));
        tcKernel<Op, BM><<<grid, kTC_THREADS, smem, stream>>>(a);
        err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

template <typename Op>
cudaError_t launchTcOp(TcArgs const& a, int64_t m, bool small, int64_t yElem, cudaStream_t stream)
{
    return small ? launchTcT<Op, 64>(a, m, yElem, stream) : launchTcT<Op, 128>(a, m, yElem, stream);
}

} // namespace

cudaError_t launchTensorCore(LaunchContext const& ctx, cudaStream_t stream)
{
    recordKernelPath(KernelPath::kTC);
    TernaryMatmulParams const& p = ctx.p;
    TcArgs a{};
    a.x = p.x;
    a.w = reinterpret_cast<uint32_t const*>(p.w);
    a.ep = makeEpilogue(p);
    a.n = p.n;
    a.k = p.k;
    a.kw = p.k / 16;
    a.magic0 = decodeMagics(p).m0;
    a.vecW = ctx.vecW;

    // Dispatch table: BM = 64 while 128-token tiles would leave SMs idle, else BM = 128;
    // operand type bf16 / fp16 (dtype) or e4m3 (ActQuant::kFP8E4M3).
    int64_t const colBlocks = a.ep.swiglu ? (a.ep.halfRows + kBN / 2 - 1) / (kBN / 2) : (a.n + kBN - 1) / kBN;
    bool const small = colBlocks * ((p.m + 127) / 128) < 2 * ctx.numSMs;
    int64_t const yElem = yElementBytes(p);
    if (p.actQuant == ActQuant::kFP8E4M3)
    {
        return launchTcOp<E4m3>(a, p.m, small, yElem, stream);
    }
    return p.dtype == DataType::kBF16 ? launchTcOp<__nv_bfloat16>(a, p.m, small, yElem, stream)
                                      : launchTcOp<__half>(a, p.m, small, yElem, stream);
}

} // namespace kernels
} // namespace terdit
