/*
 * Small-M TernaryMatMul ("skinny"): M <= 32 tokens, bound by streaming the 2-bit weights.
 *
 * Swap-AB: each warp computes Y^T = T X^T with mma.sync m16n8k16, the ternary weight as the A
 * operand (16 output features) and X^T as the B operand (8 tokens). Why this is cheap:
 * - Weights go straight from global memory into registers with fully coalesced 16-byte loads
 *   (lane (g, t) reads words 4t..4t+3 of rows g and g + 8 of a 16-row tile; the four lanes of a
 *   group cover 64 contiguous bytes of the row). Every weight byte is read exactly once.
 * - The k order inside an MMA is free as long as A and B agree: lane t owns the 64 columns
 *   64t..64t+63 of the step, and its MMA s uses the codes of word s / 4 in the pair order of
 *   decodeWordPairs. That makes the decode one mask + OR + packed subtract per pair, and the
 *   matching X pairs are one byte permute of two 16-byte loads of the token's own row.
 * - Split-K: the 8 warps of a CTA take interleaved 256-column steps of the same row tiles (or,
 *   when K has few steps, the warps are split between row tiles and steps); partial sums meet in
 *   shared memory, where the epilogue applies scale, bias and the optional SwiGLU gate. No
 *   global workspace, one launch.
 * - Decode: one LOP3 (mask-OR, the magics held in registers) and one packed subtract per pair
 *   (decodeWordPairs); the matching X pairs are one byte permute each.
 * A cp.async-ring variant of this kernel (weights through shared memory instead of register
 * prefetch, "skinny2") measured no faster on the H200 (bench/results/kernels-nvidia-h200-
 * 2026-11-26.md) and was deleted.
 */
#include "ternaryCommon.cuh"

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kWARPS = 8;
constexpr int kTHREADS = kWARPS * 32;
constexpr int kSTEP_WORDS = 16; //!< k16 words per row per step (256 columns)

struct SkinnyArgs
{
    void const* x;
    uint32_t const* w;
    EpilogueOp ep;      //!< y / xScale point at this launch's first token
    int32_t m;        //!< tokens in this launch (<= 8 * MT)
    int32_t n;        //!< weight rows
    int32_t k;
    int32_t kw;       //!< k / 16
    int32_t steps;    //!< ceil(kw / 16)
    int32_t warpsK;   //!< warps splitting K (1, 2, 4 or 8); kWARPS / warpsK warps split rows
    int32_t nTiles;   //!< n / 16
    DecodeMagics magics;
    bool vecW;
};

//! Loads the 4 words lane t owns of one weight row for one step; zero weights where out of range.
__device__ __forceinline__ void loadRowWords(
    SkinnyArgs const& a, bool rowOk, int64_t row, int32_t word0, uint32_t (&out)[4])
{
    if (a.vecW)
    {
        // K % 64 == 0 here, so the 4 words are all in range or all out of range.
        if (rowOk && word0 < a.kw)
        {
            uint4 const v = ldgStream16(a.w + row * a.kw + word0);
            out[0] = v.x;
            out[1] = v.y;
            out[2] = v.z;
            out[3] = v.w;
        }
        else
        {
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                out[i] = kZERO_WORD;
            }
        }
    }
    else
    {
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            out[i] = (rowOk && word0 + i < a.kw) ? ldgStream4(a.w + row * a.kw + word0 + i) : kZERO_WORD;
        }
    }
}

//! Physical 16-row tile of virtual tile v. SwiGLU interleaves gate and up tiles (v = 2p -> gate
//! tile p, v = 2p + 1 -> up tile p) so a CTA owning an even number of tiles owns both halves.
__device__ __forceinline__ int32_t physTile(SkinnyArgs const& a, int32_t v)
{
    return a.ep.swiglu ? ((v & 1) ? a.ep.halfRows / 16 + (v >> 1) : (v >> 1)) : v;
}

//! Two CTAs per SM (<= 128 registers) except where the activation registers of 4 words x MT
//! tiles would spill under that cap (MT = 2, R = 2 spilled 24 bytes on sm_90a once the decode
//! magics moved into registers); those variants run one CTA (8 warps) per SM, which the planner
//! counts.
__host__ __device__ constexpr int skinnyMinBlocks(int mt, int r)
{
    return (mt == 4 || (mt == 2 && r == 2)) ? 1 : 2;
}

template <typename T, int MT, int R>
__global__ void __launch_bounds__(kTHREADS, skinnyMinBlocks(MT, R)) skinnyKernel(SkinnyArgs const a)
{
    extern __shared__ float red[];

    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int const wk = warp % a.warpsK;
    int const wn = warp / a.warpsK;
    int const warpsN = kWARPS / a.warpsK;
    int const tilesPerCta = warpsN * R;
    int const rowsPerCta = tilesPerCta * 16;
    int32_t const ctaTile0 = blockIdx.x * tilesPerCta;

    int64_t rowG[R]; // physical row of this lane's "g" row in each of its tiles
    bool rowOk[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
    {
        int32_t const v = ctaTile0 + wn * R + r;
        rowOk[r] = v < a.nTiles;
        rowG[r] = static_cast<int64_t>(physTile(a, rowOk[r] ? v : 0)) * 16 + g;
    }

    float acc[R][MT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[r][mt][e] = 0.0f;

    T const* x = static_cast<T const*>(a.x);

    // With kPREFETCH the next step's weights are requested before this step's math (register
    // double buffer); the larger variants have no registers to spare for it.
    constexpr bool kPREFETCH = MT * R <= 2;
    uint32_t wr[R][2][4];
    DecodeMagics const magics = a.magics;
    if (kPREFETCH)
    {
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            loadRowWords(a, rowOk[r], rowG[r], wk * kSTEP_WORDS + 4 * t, wr[r][0]);
            loadRowWords(a, rowOk[r], rowG[r] + 8, wk * kSTEP_WORDS + 4 * t, wr[r][1]);
        }
    }

    for (int32_t step = wk; step < a.steps; step += a.warpsK)
    {
        int32_t const word0 = step * kSTEP_WORDS + 4 * t;
        uint32_t wn[R][2][4];
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            // A step past the end loads nothing (words >= kw read as zero weights).
            int32_t const loadWord0 = kPREFETCH ? word0 + a.warpsK * kSTEP_WORDS : word0;
            loadRowWords(a, rowOk[r], rowG[r], loadWord0, kPREFETCH ? wn[r][0] : wr[r][0]);
            loadRowWords(a, rowOk[r], rowG[r] + 8, loadWord0, kPREFETCH ? wn[r][1] : wr[r][1]);
        }

#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            int32_t const word = word0 + i;
            bool const wordOk = word < a.kw;
            // X[token][16 * word .. +15] for the token of this lane in each 8-token tile.
            uint32_t xr[MT][8];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
            {
                int const tok = mt * 8 + g;
                if (wordOk && tok < a.m)
                {
                    T const* src = x + static_cast<int64_t>(tok) * a.k + static_cast<int64_t>(word) * 16;
                    uint4 const lo = ldgCached16(src);
                    uint4 const hi = ldgCached16(src + 8);
                    xr[mt][0] = lo.x;
                    xr[mt][1] = lo.y;
                    xr[mt][2] = lo.z;
                    xr[mt][3] = lo.w;
                    xr[mt][4] = hi.x;
                    xr[mt][5] = hi.y;
                    xr[mt][6] = hi.z;
                    xr[mt][7] = hi.w;
                }
                else
                {
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                    {
                        xr[mt][j] = 0u;
                    }
                }
            }
            // B pairs in decodeWordPairs order: pair j = (X[c], X[c + 8]) with c = pairLo(j).
            uint32_t xb[MT][8];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < 8; ++j)
                {
                    int const c = pairLo(j);
                    xb[mt][j] = __byte_perm(xr[mt][c >> 1], xr[mt][4 + (c >> 1)], (c & 1) ? 0x7632 : 0x5410);
                }

#pragma unroll
            for (int r = 0; r < R; ++r)
            {
                uint32_t dg[8];
                uint32_t d8[8];
                decodeWordPairs<T>(wr[r][0][i], magics, dg); // row g
                decodeWordPairs<T>(wr[r][1][i], magics, d8); // row g + 8
#pragma unroll
                for (int s = 0; s < 4; ++s)
                {
                    // a0/a2: row g, a1/a3: row g + 8; a0/a1 pair with b0, a2/a3 with b1.
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                    {
                        mma16816<T>(acc[r][mt], dg[2 * s], d8[2 * s], dg[2 * s + 1], d8[2 * s + 1], xb[mt][2 * s],
                            xb[mt][2 * s + 1]);
                    }
                }
            }
        }

        if (kPREFETCH)
        {
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        wr[r][h][i] = wn[r][h][i];
        }
    }

    // Partial sums -> shared memory, token-major: red[wk][token][row], row stride rowsPerCta + 4
    // (the +4 keeps the 32 lanes of a store on distinct banks).
    int const stride = rowsPerCta + 4;
    int const tokens = MT * 8;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                int const rowLocal = (wn * R + r) * 16 + g + ((e & 2) ? 8 : 0);
                int const tok = mt * 8 + 2 * t + (e & 1);
                red[(wk * tokens + tok) * stride + rowLocal] = acc[r][mt][e];
            }
    __syncthreads();

    int const mRows = a.m < tokens ? a.m : tokens;
    if (!a.ep.swiglu)
    {
        for (int idx = threadIdx.x; idx < mRows * rowsPerCta; idx += kTHREADS)
        {
            int const tok = idx / rowsPerCta;
            int const rowLocal = idx - tok * rowsPerCta;
            int32_t const row = ctaTile0 * 16 + rowLocal;
            if (row < a.n)
            {
                float s = 0.0f;
                for (int q = 0; q < a.warpsK; ++q)
                {
                    s += red[(q * tokens + tok) * stride + rowLocal];
                }
                a.ep.storeFeature(tok, row, s, a.ep.tokenScale(tok));
            }
        }
    }
    else
    {
        int const colsPerCta = rowsPerCta / 2;
        for (int idx = threadIdx.x; idx < mRows * colsPerCta; idx += kTHREADS)
        {
            int const tok = idx / colsPerCta;
            int const j = idx - tok * colsPerCta;
            int const pLocal = j >> 4;
            int const i = j & 15;
            int32_t const col = (ctaTile0 / 2 + pLocal) * 16 + i; // gate row == output column
            if (col < a.ep.halfRows)
            {
                int const gateLocal = (2 * pLocal) * 16 + i;
                int const upLocal = gateLocal + 16;
                float sg = 0.0f;
                float su = 0.0f;
                for (int q = 0; q < a.warpsK; ++q)
                {
                    sg += red[(q * tokens + tok) * stride + gateLocal];
                    su += red[(q * tokens + tok) * stride + upLocal];
                }
                a.ep.storeSwiglu(tok, col, sg, su, a.ep.tokenScale(tok));
            }
        }
    }
}

//! Work split of one launch: warps along K, 16-row tiles per warp.
struct SkinnyPlan
{
    int warpsK;
    int rowTiles; // R
};

//! Picks (warpsK, R) with a small cost model: waves of CTAs (1 or 2 resident per SM) times the steps
//! each warp walks, times the per-step cost (R row tiles plus the activation loads). On ties the
//! larger R wins (each activation load then feeds more MMAs).
SkinnyPlan planSkinny(int32_t nTiles, int32_t steps, int mt, bool swiglu, int numSMs)
{
    SkinnyPlan best{1, 1};
    double bestCost = 1e300;
    int const maxR = mt == 1 ? 4 : 2; // R = 4 with 16+ tokens would run one CTA per SM and never wins
    for (int warpsK = 1; warpsK <= kWARPS; warpsK *= 2)
    {
        if (warpsK > 1 && warpsK > steps)
        {
            break;
        }
        int const warpsN = kWARPS / warpsK;
        for (int r = 1; r <= maxR; r *= 2)
        {
            int const tiles = warpsN * r;
            if (swiglu && (tiles & 1))
            {
                continue;
            }
            int64_t const ctas = (nTiles + tiles - 1) / tiles;
            int64_t const resident = static_cast<int64_t>(skinnyMinBlocks(mt, r)) * numSMs;
            int64_t const waves = (ctas + resident - 1) / resident;
            int64_t const walk = (steps + warpsK - 1) / warpsK;
            double const cost = static_cast<double>(waves) * walk * (r + 1.0 * mt);
            if (cost < bestCost || (cost == bestCost && tiles >= best.rowTiles * (kWARPS / best.warpsK)))
            {
                bestCost = cost;
                best = SkinnyPlan{warpsK, r};
            }
        }
    }
    return best;
}

template <typename T, int MT, int R>
cudaError_t launchSkinnyT(SkinnyArgs const& a, cudaStream_t stream)
{
    int const tilesPerCta = (kWARPS / a.warpsK) * R;
    int const ctas = (a.nTiles + tilesPerCta - 1) / tilesPerCta;
    size_t const smem = sizeof(float) * a.warpsK * (MT * 8) * (tilesPerCta * 16 + 4); // <= 37 KB
    skinnyKernel<T, MT, R><<<ctas, kTHREADS, smem, stream>>>(a);
    return cudaGetLastError();
}

// Dispatch table: (MT, R) -> instantiation. MT = 8-token tiles, R = 16-row tiles per warp.
template <typename T>
cudaError_t dispatchSkinny(SkinnyArgs const& a, int mt, int r, cudaStream_t stream)
{
#define TERDIT_SKINNY_CASE(MT_, R_)                                                                              \
    if (mt == MT_ && r == R_)                                                                                    \
    {                                                                                                            \
        return launchSkinnyT<T, MT_, R_>(a, stream);                                                             \
    }
    TERDIT_SKINNY_CASE(1, 1)
    TERDIT_SKINNY_CASE(1, 2)
    TERDIT_SKINNY_CASE(1, 4)
    TERDIT_SKINNY_CASE(2, 1)
    TERDIT_SKINNY_CASE(2, 2)
    TERDIT_SKINNY_CASE(4, 1)
    TERDIT_SKINNY_CASE(4, 2)
#undef TERDIT_SKINNY_CASE
    return cudaErrorInvalidConfiguration;
}

} // namespace

cudaError_t launchSkinny(LaunchContext const& ctx, cudaStream_t stream)
{
    recordKernelPath(KernelPath::kSKINNY);
    TernaryMatmulParams const& p = ctx.p;
    EpilogueOp const ep = makeEpilogue(p);
    int64_t const elem = xElementBytes(p);

    SkinnyArgs a{};
    a.w = reinterpret_cast<uint32_t const*>(p.w);
    a.ep = ep;
    a.n = p.n;
    a.k = p.k;
    a.kw = p.k / 16;
    a.steps = (a.kw + kSTEP_WORDS - 1) / kSTEP_WORDS;
    a.nTiles = p.n / 16;
    a.magics = decodeMagics(p);
    a.vecW = ctx.vecW;

    // Tokens beyond kSKINNY_MAX_M (only when the path is forced) run as further launches.
    for (int64_t m0 = 0; m0 < p.m; m0 += kSKINNY_MAX_M)
    {
        int64_t const m = (p.m - m0) < kSKINNY_MAX_M ? (p.m - m0) : kSKINNY_MAX_M;
        int const mt = m <= 8 ? 1 : (m <= 16 ? 2 : 4);
        SkinnyPlan const plan = planSkinny(a.nTiles, a.steps, mt, ep.swiglu, ctx.numSMs);
        a.x = static_cast<char const*>(p.x) + m0 * p.k * elem;
        a.ep.y = static_cast<char*>(p.y) + m0 * ep.ldy * yElementBytes(p);
        a.m = static_cast<int32_t>(m);
        a.warpsK = plan.warpsK;
        cudaError_t const err = p.dtype == DataType::kBF16
            ? dispatchSkinny<__nv_bfloat16>(a, mt, plan.rowTiles, stream)
            : dispatchSkinny<__half>(a, mt, plan.rowTiles, stream);
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

} // namespace kernels
} // namespace terdit
