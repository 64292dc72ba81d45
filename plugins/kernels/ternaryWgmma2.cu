/*
 * Large-M TernaryMatMul on Hopper, pipelined ("wgmma2", sm_90a).
 *
 * Same math and operand roles as the wgmma kernel (swap-AB: D^T = T X^T with
 * wgmma.mma_async m64n128k16, A = ternary weights decoded into registers, B = X tile in shared
 * memory, K-major, 128-byte swizzle, descriptor stride 1024 B), restructured so that the tensor
 * cores never wait for the decode or the loads:
 * - Decode and MMA overlap: the A fragments of a k tile go to one of two register sets; the
 *   wgmmas of tile kt are committed as one group and `wgmma.wait_group 1` only retires tile kt - 1,
 *   so tile kt + 1 is decoded while tile kt runs (A registers of an in-flight wgmma are never
 *   written: tile kt + 1 uses the other set, the one tile kt - 1 has released).
 * - More tokens per decoded weight: a warpgroup owns MW m64 feature tiles x NB 128-token tiles;
 *   each decoded A fragment feeds NB wgmmas (the decode cost is per weight element, the MMA work
 *   per element grows with the tokens).
 * - Cheap decode: decodeFragPair (byte permute, mask-OR, packed subtract) per A register.
 * - Lean producer: 5-stage cp.async ring filled by all threads from per-thread row pointers
 *   computed once; rows past M / N are clamped onto valid rows (they only feed outputs that are
 *   never written), only the K tail is zero-filled. One barrier per k tile; the stage refilled at
 *   tile kt is the one tile kt - 2 used, which every warpgroup has retired by then.
 * Tile configurations (features x tokens per CTA, 2 warpgroups): 128 x 256 (MW 1, NB 2),
 * 256 x 128 (MW 2, NB 1), 128 x 128 (MW 1, NB 1, two CTAs per SM); launchWgmma2 picks one with a
 * wave-quantization cost model.
 * This was the Hopper default until the warp-specialized TMA kernel (ternaryWgmma.cu) replaced it;
 * it stays, reachable only as KernelPath::kWGMMA2 (bf16 / fp16), for one GPU run that measures
 * both, and is deleted after it if the new kernel wins.
 * SwiGLU: as in the wgmma kernel, each warp's 16 rows are 8 gate rows and the 8 matching up rows.
 * The sm_80 build of this file holds empty kernels; the dispatcher only picks it on sm_90.
 */
#include "ternaryCommon.cuh"

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kW2_THREADS = 256;
constexpr int kW2_BK = 64;     //!< k columns per tile (one 128-byte swizzle row of X)
constexpr int kW2_STAGES = 5;  //!< shared-memory ring depth; 3 tiles in flight ahead of the MMA
constexpr int kW2_MAX_GRID_Y = 65535;

struct W2Args
{
    void const* x;
    uint32_t const* w;
    EpilogueOp ep; //!< y / xScale point at this launch's first token
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t kw;
    int32_t halfRows;
    uint32_t magicFrag;
    bool swiglu;
    bool vecW;
};

//! CTA tile: 2 warpgroups x MW m64 feature tiles, NB x 128 tokens.
template <int MW, int NB>
struct W2Tile
{
    static constexpr int kFEATURES = 128 * MW;
    static constexpr int kTOKENS = 128 * NB;
    static constexpr int kX_BYTES = kTOKENS * kW2_BK * 2;
    static constexpr int kSTAGE_BYTES = kX_BYTES + kFEATURES * 16; // multiple of 1024
    static constexpr int kSMEM_BYTES = kW2_STAGES * kSTAGE_BYTES + 1024; // + slack for alignment
    static constexpr int kX_CHUNKS = kTOKENS * 8 / kW2_THREADS;        //!< 16-byte X copies per thread
    //! The 128 x 128 tile fits two CTAs per SM (registers <= 128, shared memory 91 KB each).
    static constexpr int kMIN_BLOCKS = MW * NB == 1 ? 2 : 1;
    static_assert(kSTAGE_BYTES % 1024 == 0, "stages must stay 1024-byte aligned for the swizzle");
    static_assert(kFEATURES <= kW2_THREADS, "one 16-byte weight copy per thread and row");
    static_assert(kX_CHUNKS * kW2_THREADS == kTOKENS * 8, "X tile copies in whole rounds");
};

//! Physical weight row of CTA row sr of feature block fb, clamped onto a valid row (rows past N
//! only feed outputs that are never written). SwiGLU: rows 0-7 of each 16-row unit are gate rows,
//! rows 8-15 the matching up rows.
template <int MW, int NB>
__device__ __forceinline__ int32_t w2PhysRow(W2Args const& a, int fb, int sr)
{
    constexpr int kF = W2Tile<MW, NB>::kFEATURES;
    if (!a.swiglu)
    {
        int32_t const row = fb * kF + sr;
        return row < a.n ? row : a.n - 1;
    }
    int32_t col = fb * (kF / 2) + (sr >> 4) * 8 + (sr & 7);
    col = col < a.halfRows ? col : a.halfRows - 1;
    return (sr & 8) ? a.halfRows + col : col;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
//! Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t w2Desc(uint32_t smemAddr)
{
    uint64_t desc = static_cast<uint64_t>((smemAddr & 0x3FFFFu) >> 4); // start address
    desc |= static_cast<uint64_t>(1) << 16;                          // leading offset (unused here)
    desc |= static_cast<uint64_t>(1024 >> 4) << 32;                  // stride offset
    desc |= static_cast<uint64_t>(1) << 62;                          // 128-byte swizzle
    return desc;
}
#endif

//! Per-thread producer state, computed once: where this thread's X and W copies come from and go.
template <typename T, int MW, int NB>
struct W2Producer
{
    using Tile = W2Tile<MW, NB>;
    T const* xRow;                      //!< X row m0 (the CTA's first token)
    int32_t xOff[Tile::kX_CHUNKS];      //!< element offset of chunk i's row from xRow (rows clamped)
    uint32_t xDst;                      //!< shared offset of chunk 0 in a stage (chunk i: + 4096 i)
    int32_t xCol;                       //!< first column of this thread's chunk within a k tile
    uint32_t const* wRow;               //!< vecW: this thread's weight row (threads < kFEATURES)

    __device__ __forceinline__ void init(W2Args const& a, int64_t m0, int fb)
    {
        int const tid = threadIdx.x;
        int const row0 = tid >> 3;
        int const chunk = tid & 7;
        int32_t const rows = static_cast<int32_t>(a.m - m0 < Tile::kTOKENS ? a.m - m0 : Tile::kTOKENS);
        xRow = static_cast<T const*>(a.x) + m0 * a.k;
#pragma unroll
        for (int i = 0; i < Tile::kX_CHUNKS; ++i)
        {
            int32_t const r = row0 + 32 * i;
            xOff[i] = (r < rows ? r : rows - 1) * a.k;
        }
        // Chunk c of row r lands at chunk c ^ (r & 7): the 128-byte swizzle of a 1024-byte aligned
        // tile. r & 7 is the same for all of this thread's rows (they are 32 apart).
        xDst = row0 * 128 + ((chunk ^ (row0 & 7)) << 4);
        xCol = chunk * 8;
        wRow = a.w + static_cast<int64_t>(w2PhysRow<MW, NB>(a, fb, tid < Tile::kFEATURES ? tid : 0)) * a.kw;
    }

    __device__ __forceinline__ void load(W2Args const& a, int fb, uint32_t stage, int kt) const
    {
        int32_t const col = kt * kW2_BK + xCol;
        bool const colOk = col < a.k; // K % 16 == 0: an 8-column chunk is all in or all out
        uint32_t const bytes = colOk ? 16u : 0u;
        int32_t const colSafe = colOk ? col : 0;
#pragma unroll
        for (int i = 0; i < Tile::kX_CHUNKS; ++i)
        {
            cpAsync16(stage + xDst + i * 4096, xRow + xOff[i] + colSafe, bytes);
        }

        uint32_t const sw = stage + Tile::kX_BYTES;
        int32_t const word0 = kt * (kW2_BK / 16);
        int const tid = threadIdx.x;
        if (a.vecW)
        {
            // K % 64 == 0: every tile is a full 16-byte word quad of each row.
            if (tid < Tile::kFEATURES)
            {
                cpAsync16(sw + tid * 16, wRow + word0, 16u);
            }
        }
        else
        {
            // 4-byte copies; words past K are zero-filled (their X columns are zero too).
#pragma unroll
            for (int it = 0; it < Tile::kFEATURES * 4 / kW2_THREADS; ++it)
            {
                int const idx = tid + it * kW2_THREADS;
                int const sr = idx >> 2;
                int const q = idx & 3;
                bool const ok = word0 + q < a.kw;
                uint32_t const* src = a.w + static_cast<int64_t>(w2PhysRow<MW, NB>(a, fb, sr)) * a.kw
                    + (ok ? word0 + q : 0);
                cpAsync4(sw + sr * 16 + q * 4, src, ok ? 4u : 0u);
            }
        }
    }
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
//! One k tile of one warpgroup: decode its A fragments into `af`, then issue and commit its
//! MW x 4 x NB wgmmas. Returns with the group in flight.
template <typename T, int MW, int NB>
__device__ __forceinline__ void w2Mma(float (&acc)[MW][NB][64], uint32_t (&af)[MW][4][4], uint32_t sx,
    char const* swGeneric, int rowG, uint32_t shift, uint32_t selLo, uint32_t selHi, uint32_t magic)
{
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
    {
        // Rows g and g + 8 of this warp's 16; word kk holds columns 16 kk .. 16 kk + 15 of the tile.
        uint4 const lo = *reinterpret_cast<uint4 const*>(swGeneric + (rowG + mw * 64) * 16);
        uint4 const hi = *reinterpret_cast<uint4 const*>(swGeneric + (rowG + mw * 64 + 8) * 16);
        uint32_t const wlo[4] = {lo.x, lo.y, lo.z, lo.w};
        uint32_t const whi[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
        {
            uint32_t const xl = wlo[kk] >> shift;
            uint32_t const xh = whi[kk] >> shift;
            af[mw][kk][0] = decodeFragPair<T>(xl, selLo, magic); // row g, columns 2t, 2t + 1
            af[mw][kk][1] = decodeFragPair<T>(xh, selLo, magic); // row g + 8
            af[mw][kk][2] = decodeFragPair<T>(xl, selHi, magic); // row g, columns 2t + 8, 2t + 9
            af[mw][kk][3] = decodeFragPair<T>(xh, selHi, magic); // row g + 8
        }
    }
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int i = 0; i < 64; ++i)
                pin(acc[mw][nb][i]);
    // B = tokens 128 nb .. 128 nb + 127, columns 16 kk .. 16 kk + 15 (32 bytes into each row). The
    // descriptors are formed before the fence: ptxas serializes a wgmma group whose input
    // registers are defined by other instructions inside it.
    uint64_t desc[4][NB];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
            desc[kk][nb] = w2Desc(sx + nb * 128 * 128 + kk * 32);
    wgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int mw = 0; mw < MW; ++mw)
                wgmmaM64N128K16<T>(acc[mw][nb], af[mw][kk], desc[kk][nb]);
    wgmmaCommit();
}

//! Keeps a retired A register set live up to this point, so the compiler cannot hand its
//! registers to the next tile's decode while the wgmmas reading them may still run.
template <int MW>
__device__ __forceinline__ void w2PinFragments(uint32_t (&af)[MW][4][4])
{
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                pin(af[mw][kk][r]);
}
#endif

template <typename T, int MW, int NB>
__global__ void __launch_bounds__(kW2_THREADS, W2Tile<MW, NB>::kMIN_BLOCKS) w2Kernel(W2Args const a)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Tile = W2Tile<MW, NB>;
    extern __shared__ char smemRaw[];
    uint32_t const smemBase = (smemAddress(smemRaw) + 1023u) & ~1023u;
    char* const smemGeneric = smemRaw + (smemBase - smemAddress(smemRaw));

    int const wg = threadIdx.x >> 7;
    int const warp = (threadIdx.x >> 5) & 3;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int const fb = blockIdx.x;
    int64_t const m0 = static_cast<int64_t>(blockIdx.y) * Tile::kTOKENS;
    int const kTiles = (a.k + kW2_BK - 1) / kW2_BK;

    W2Producer<T, MW, NB> producer;
    producer.init(a, m0, fb);
#pragma unroll
    for (int s = 0; s < kW2_STAGES - 2; ++s)
    {
        if (s < kTiles)
        {
            producer.load(a, fb, smemBase + s * Tile::kSTAGE_BYTES, s);
        }
        cpAsyncCommit();
    }

    float acc[MW][NB][64];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int i = 0; i < 64; ++i)
                acc[mw][nb][i] = 0.0f;
    uint32_t af0[MW][4][4];
    uint32_t af1[MW][4][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r)
            {
                af0[mw][kk][r] = 0u;
                af1[mw][kk][r] = 0u;
            }

    int const rowG = wg * 64 * MW + warp * 16 + g; // CTA row of this lane's "g" row in m64 tile 0
    uint32_t const shift = 4u * (t & 1);
    uint32_t const selLo = fragSelector(t >> 1);
    uint32_t const selHi = fragSelector(2 + (t >> 1));
    uint32_t const magic = a.magicFrag;

    // One k tile: wait for its stage, refill the stage tile kt - 2 used, decode + issue, then
    // retire tile kt - 1 (wait_group 1) so its A registers and stage become free.
    auto step = [&](int kt, uint32_t(&afCur)[MW][4][4], uint32_t(&afPrev)[MW][4][4]) {
        cpAsyncWait<kW2_STAGES - 3>();
        fenceProxyAsync();
        __syncthreads();
        int const next = kt + kW2_STAGES - 2;
        if (next < kTiles)
        {
            producer.load(a, fb, smemBase + (next % kW2_STAGES) * Tile::kSTAGE_BYTES, next);
        }
        cpAsyncCommit();
        int const stage = kt % kW2_STAGES;
        w2Mma<T, MW, NB>(acc, afCur, smemBase + stage * Tile::kSTAGE_BYTES,
            smemGeneric + stage * Tile::kSTAGE_BYTES + Tile::kX_BYTES, rowG, shift, selLo, selHi, magic);
        wgmmaWait<1>();
        w2PinFragments<MW>(afPrev);
    };
    // Pairs of tiles, then the odd one: every path into a step that decodes into a register set
    // has retired that set's last group (a conditional second step inside the loop would let ptxas
    // see a path where it has not, and it would serialize all wgmmas).
    int kt = 0;
    for (; kt + 1 < kTiles; kt += 2)
    {
        step(kt, af0, af1);
        step(kt + 1, af1, af0);
    }
    if (kt < kTiles)
    {
        step(kt, af0, af1);
    }
    wgmmaWait<0>();
    w2PinFragments<MW>(af0);
    w2PinFragments<MW>(af1);
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int i = 0; i < 64; ++i)
                pin(acc[mw][nb][i]);
    cpAsyncWait<0>();

    // Accumulator element 4j + e of n128 tile nb: feature row g (+8 for e >= 2) of the warp's 16,
    // token 128 nb + 8j + 2t + (e & 1).
    EpilogueOp const& ep = a.ep;
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
    {
        int const unit = wg * 4 * MW + mw * 4 + warp; // 16-row unit of the CTA
        if (!a.swiglu)
        {
            int32_t const f0 = fb * Tile::kFEATURES + unit * 16 + g;
            int32_t const f1 = f0 + 8;
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int j = 0; j < 16; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                    {
                        int64_t const tok = m0 + nb * 128 + j * 8 + 2 * t + e;
                        if (tok < a.m)
                        {
                            if (f0 < a.n)
                            {
                                ep.storeFeature(tok, f0, acc[mw][nb][4 * j + e], 1.0f);
                            }
                            if (f1 < a.n)
                            {
                                ep.storeFeature(tok, f1, acc[mw][nb][4 * j + 2 + e], 1.0f);
                            }
                        }
                    }
        }
        else
        {
            int32_t const col = fb * (Tile::kFEATURES / 2) + unit * 8 + g;
            if (col < a.halfRows)
            {
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int j = 0; j < 16; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                        {
                            int64_t const tok = m0 + nb * 128 + j * 8 + 2 * t + e;
                            if (tok < a.m)
                            {
                                ep.storeSwiglu(tok, col, acc[mw][nb][4 * j + e], acc[mw][nb][4 * j + 2 + e], 1.0f);
                            }
                        }
            }
        }
    }
#else
    // This body exists only in the sm_90a SASS, which the launcher runs on compute capability 9.0.
    // Reaching this means the driver JIT-compiled the generic compute_90 PTX for a Hopper GPU
    // (CUDA_FORCE_PTX_JIT=1): fail loudly instead of leaving Y unwritten.
    __trap();
#endif
}

template <typename T, int MW, int NB>
cudaError_t launchW2T(W2Args a, int64_t mTotal, cudaStream_t stream)
{
    using Tile = W2Tile<MW, NB>;
    cudaError_t err = configureSmem<w2Kernel<T, MW, NB>>(Tile::kSMEM_BYTES);
    if (err != cudaSuccess)
    {
        return err;
    }
    int64_t const outCols = a.swiglu ? a.halfRows : a.n;
    int const gridX = a.swiglu ? (a.halfRows + Tile::kFEATURES / 2 - 1) / (Tile::kFEATURES / 2)
                               : (a.n + Tile::kFEATURES - 1) / Tile::kFEATURES;
    int64_t const chunk = static_cast<int64_t>(kW2_MAX_GRID_Y) * Tile::kTOKENS;
    char const* x0 = static_cast<char const*>(a.x);
    char* y0 = static_cast<char*>(a.ep.y);
    for (int64_t m0 = 0; m0 < mTotal; m0 += chunk)
    {
        int64_t const m = (mTotal - m0) < chunk ? (mTotal - m0) : chunk;
        a.x = x0 + m0 * a.k * 2;
        a.ep.y = y0 + m0 * outCols * 2;
        a.m = static_cast<int32_t>(m);
        dim3 const grid(gridX, static_cast<unsigned>((m + Tile::kTOKENS - 1) / Tile::kTOKENS));
        w2Kernel<T, MW, NB><<<grid, kW2_THREADS, Tile::kSMEM_BYTES, stream>>>(a);
        err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

//! Tile configurations, (MW, NB): 128 x 256, 256 x 128, 128 x 128 (features x tokens).
enum class W2Config
{
    k128x256,
    k256x128,
    k128x128,
};

//! Wave-quantization cost model: the busiest SM runs ceil(tiles / numSMs) CTA tiles (co-resident
//! CTAs share it), each worth its MMA work, with a 15% penalty on the small tile (more decode and
//! X traffic per MAC, more per-tile overhead). Ties go to the larger tiles, 128 x 256 first (each
//! decoded fragment feeds two wgmmas).
W2Config w2Choose(int64_t m, int32_t n, int numSMs)
{
    struct Option
    {
        W2Config config;
        int features; // weight rows per CTA
        int tokens;
        double penalty;
    };
    Option const options[] = {{W2Config::k128x256, 128, 256, 1.0}, {W2Config::k256x128, 256, 128, 1.0},
        {W2Config::k128x128, 128, 128, 1.15}};
    W2Config best = W2Config::k128x256;
    double bestCost = 1e300;
    for (Option const& o : options)
    {
        int64_t const tiles = ((n + o.features - 1) / o.features) * ((m + o.tokens - 1) / o.tokens);
        int64_t const perSM = (tiles + numSMs - 1) / numSMs;
        double const cost = static_cast<double>(perSM) * o.features * o.tokens * o.penalty;
        if (cost < bestCost * 0.999)
        {
            bestCost = cost;
            best = o.config;
        }
    }
    return best;
}

template <typename T>
cudaError_t launchW2Config(W2Args const& a, int64_t m, W2Config config, cudaStream_t stream)
{
    switch (config)
    {
    case W2Config::k128x256: return launchW2T<T, 1, 2>(a, m, stream);
    case W2Config::k256x128: return launchW2T<T, 2, 1>(a, m, stream);
    case W2Config::k128x128: return launchW2T<T, 1, 1>(a, m, stream);
    }
    return cudaErrorInvalidConfiguration;
}

} // namespace

cudaError_t launchWgmma2(LaunchContext const& ctx, cudaStream_t stream)
{
    recordKernelPath(KernelPath::kWGMMA2);
    TernaryMatmulParams const& p = ctx.p;
    W2Args a{};
    a.x = p.x;
    a.w = reinterpret_cast<uint32_t const*>(p.w);
    a.ep = makeEpilogue(p);
    a.n = p.n;
    a.k = p.k;
    a.kw = p.k / 16;
    a.halfRows = p.n / 2;
    a.swiglu = a.ep.swiglu;
    a.magicFrag = decodeMagics(p).frag;
    a.vecW = ctx.vecW;

    // Weight rows per CTA tile are the same with SwiGLU (it halves rows and output columns alike).
    W2Config const config = w2Choose(p.m, p.n, ctx.numSMs);
    return p.dtype == DataType::kBF16 ? launchW2Config<__nv_bfloat16>(a, p.m, config, stream)
                                      : launchW2Config<__half>(a, p.m, config, stream);
}

} // namespace kernels
} // namespace terdit
