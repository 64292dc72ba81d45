/*
 * Large-M TernaryMatMul on Hopper ("wgmma", sm_90a): the default for M > 32 (and every W1.58A8
 * product) on sm_90.
 *
 * Swap-AB, D^T = T X^T: the ternary weights are the A operand of wgmma.mma_async (decoded from
 * the 2-bit codes into registers: bf16 / fp16 for m64nNk16, e4m3 for the W1.58A8 m64nNk32), the
 * activations the B operand, read by the tensor cores from shared memory (K-major, 128-byte
 * swizzle). CTA tile: 128 weight rows x TOK tokens (TOK = 128 or 256; one wgmma's N), 384
 * threads: two consumer warpgroups (64 weight rows each) and one producer warpgroup, registers
 * moved from the producer to the consumers with setmaxnreg.
 * - Producer / consumer split: one thread of the producer warpgroup issues every load with the
 *   bulk tensor copy engine (TMA: one 2-D box of X per stage, 128-byte swizzle = the wgmma B
 *   layout; one box of weight codes, 16 or 32 bytes per row) into a ring of stages, each guarded by
 *   a "full" mbarrier (the copies' byte count) and an "empty" one (all 256 consumer threads). The
 *   consumers never compute an address of global memory or wait at a CTA barrier.
 * - Decode overlaps the MMA: the A fragments of a k tile go to one of two register sets; the
 *   wgmmas of k tile kt are one commit group and `wgmma.wait_group 1` retires only k tile kt - 1,
 *   whose stage is then released to the producer, so k tile kt + 1 is decoded while kt runs (pairs
 *   of k tiles plus a tail keep ptxas from serializing the wgmmas, as in wgmma2).
 * - Persistent grid: min(tiles, SMs) CTAs walk the tiles (feature-tile-major: neighbouring CTAs
 *   share the X tile in L2); the producer runs ahead into the next tile while the consumers store
 *   the current one, so loads overlap the epilogue. TOK comes from a wave cost model (M = 512 on
 *   narrow layers takes 128-token tiles to fill more SMs).
 * - Weights in the order the MMA consumes them: each consumer thread reads exactly the rows its
 *   A fragment needs (rows g and g + 8 of its warp) as 16-byte words; for SwiGLU the weight box
 *   is 64 gate rows then the 64 matching up rows, and a thread's two rows are a gate row and its
 *   up row, so the gate is applied on the accumulators.
 * - W1.58A8: the per-token scale (xScale) joins the per-channel scale in the one epilogue.
 * Out-of-range tokens / rows / k columns are zero-filled by TMA (never stored, or multiplied by
 * zero activations). Needs 16-byte weight row strides (K % 64 == 0): the dispatcher runs tc
 * otherwise. The sm_80 build of this file holds empty kernels.
 */
#include "ternaryCommon.cuh"

#include <cuda.h>         // CUtensorMap and its enums (types only: the library does not link libcuda)
#include <cudaTypedefs.h> // PFN_cuTensorMapEncodeTiled

#include <type_traits>

namespace terdit
{
namespace kernels
{
namespace
{

constexpr int kWS_CONSUMERS = 256;                  //!< two warpgroups
constexpr int kWS_THREADS = kWS_CONSUMERS + 128;    //!< + the producer warpgroup
//! Registers per thread after setmaxnreg: 2 x 128 x 232 + 128 x 40 <= 64 K. The launch bound alone
//! caps every thread at 168 (ptxas sizes the register file in 4-warp units), too few for 128
//! accumulators of a 256-token tile plus two fragment sets; the producer needs almost none.
constexpr int kWS_CONSUMER_REGS = 232;
constexpr int kWS_PRODUCER_REGS = 40;
static_assert(2 * 128 * kWS_CONSUMER_REGS + 128 * kWS_PRODUCER_REGS <= 64 * 1024, "register file of one SM");
constexpr int kWS_ROWS = 128;                       //!< weight rows per tile (64 per warpgroup)
constexpr int kWS_SMEM_BUDGET = 200 * 1024;         //!< ring bytes (227 KB per CTA at most)
constexpr int kWS_MAX_STAGES = 8;

//! Operand traits: k columns per stage (128 bytes of X per token), weight bytes per row and stage.
template <typename Op>
struct WsOp
{
    using Mma = Op;
    static constexpr int kBK = 64;
    static constexpr int kW_BYTES = 16;
    static constexpr int kELEM = 2;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using E4m3Mma = E4m3Operand;
#else
using E4m3Mma = E4m3;
#endif

template <>
struct WsOp<E4m3>
{
    using Mma = E4m3Mma;
    static constexpr int kBK = 128;
    static constexpr int kW_BYTES = 32;
    static constexpr int kELEM = 1;
};

template <typename Op, int TOK>
struct WsTile
{
    static constexpr int kX_BYTES = TOK * 128;
    static constexpr int kW_BYTES = kWS_ROWS * WsOp<Op>::kW_BYTES;
    static constexpr int kSTAGE_BYTES = (kX_BYTES + kW_BYTES + 1023) / 1024 * 1024; // X stays 1024-aligned
    static constexpr int kSTAGES
        = kWS_SMEM_BUDGET / kSTAGE_BYTES < kWS_MAX_STAGES ? kWS_SMEM_BUDGET / kSTAGE_BYTES : kWS_MAX_STAGES;
    static constexpr int kSMEM_BYTES = kSTAGES * kSTAGE_BYTES + 2 * kSTAGES * 8 + 1024; // + barriers + align
    static constexpr uint32_t kTX_BYTES = kX_BYTES + kW_BYTES; // both boxes, zero fill included
    static constexpr int kACC = TOK / 2;                         //!< fp32 accumulators per thread
    static_assert(kSTAGES >= 3, "the ring needs at least three stages");
    static_assert(kTX_BYTES < (1u << 20), "an mbarrier counts at most 2^20 - 1 transaction bytes");
    static_assert(kACC * 128 == TOK * 64, "a warpgroup's m64 x TOK accumulators over its 128 threads");
};

struct WsArgs
{
    EpilogueOp ep;
    int64_t m;
    int64_t tiles;     //!< featTiles x token tiles
    int32_t n;         //!< weight rows
    int32_t kTiles;
    int32_t featTiles; //!< tiles along the weight rows (SwiGLU: 64 output columns each)
    uint32_t magicFrag; //!< DecodeMagics::frag of the 16-bit type (in a register, not an immediate)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
//! Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t wsDesc(uint32_t smemAddr)
{
    uint64_t desc = static_cast<uint64_t>((smemAddr & 0x3FFFFu) >> 4); // start address
    desc |= static_cast<uint64_t>(1) << 16;                          // leading offset (unused here)
    desc |= static_cast<uint64_t>(1024 >> 4) << 32;                  // stride offset
    desc |= static_cast<uint64_t>(1) << 62;                          // 128-byte swizzle
    return desc;
}

//! The A fragments of one k tile for the two weight rows of this lane (smem rows lo / hi).
template <typename Op>
struct WsDecode
{
    uint32_t shift, selLo, selHi, magic;
    __device__ __forceinline__ void init(int t, uint32_t magicFrag)
    {
        shift = 4u * (t & 1);
        selLo = fragSelector(t >> 1);
        selHi = fragSelector(2 + (t >> 1));
        magic = magicFrag;
    }
    __device__ __forceinline__ void run(uint32_t (&af)[4][4], char const* sw, int rowLo, int rowHi) const
    {
        uint4 const lo = *reinterpret_cast<uint4 const*>(sw + rowLo * 16);
        uint4 const hi = *reinterpret_cast<uint4 const*>(sw + rowHi * 16);
        uint32_t const wlo[4] = {lo.x, lo.y, lo.z, lo.w};
        uint32_t const whi[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
        {
            uint32_t const xl = wlo[kk] >> shift;
            uint32_t const xh = whi[kk] >> shift;
            af[kk][0] = decodeFragPair<Op>(xl, selLo, magic); // row lo, columns 2t, 2t + 1
            af[kk][1] = decodeFragPair<Op>(xh, selLo, magic); // row hi
            af[kk][2] = decodeFragPair<Op>(xl, selHi, magic); // row lo, columns 2t + 8, 2t + 9
            af[kk][3] = decodeFragPair<Op>(xh, selHi, magic); // row hi
        }
    }
};

template <>
struct WsDecode<E4m3>
{
    uint32_t sel, lut;
    __device__ __forceinline__ void init(int t, uint32_t)
    {
        sel = quadSelector(t);
        lut = kE4M3_LUT;
    }
    //! k32 step kk: a0 / a2 = columns 4t .. of words 2kk / 2kk + 1 of row lo, a1 / a3 of row hi.
    __device__ __forceinline__ void run(uint32_t (&af)[4][4], char const* sw, int rowLo, int rowHi) const
    {
#pragma unroll
        for (int h = 0; h < 2; ++h)
        {
            uint4 const lo = *reinterpret_cast<uint4 const*>(sw + rowLo * 32 + h * 16);
            uint4 const hi = *reinterpret_cast<uint4 const*>(sw + rowHi * 32 + h * 16);
            decodeE4m3Quads(lo.x, lo.y, sel, lut, af[2 * h][0], af[2 * h][2]);
            decodeE4m3Quads(hi.x, hi.y, sel, lut, af[2 * h][1], af[2 * h][3]);
            decodeE4m3Quads(lo.z, lo.w, sel, lut, af[2 * h + 1][0], af[2 * h + 1][2]);
            decodeE4m3Quads(hi.z, hi.w, sel, lut, af[2 * h + 1][1], af[2 * h + 1][3]);
        }
    }
};

template <int N>
__device__ __forceinline__ void wsPin(float (&v)[N])
{
#pragma unroll
    for (int i = 0; i < N; ++i)
    {
        pin(v[i]);
    }
}

__device__ __forceinline__ void wsPin(uint32_t (&af)[4][4])
{
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r)
            pin(af[kk][r]);
}
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
//! The consumer warpgroups' loop over their tiles (the else branch of the kernel's role split).
template <typename Op, int TOK>
__device__ __forceinline__ void wsConsume(
    WsArgs const& a, uint32_t base, char* baseGeneric, uint32_t fullBar, uint32_t emptyBar)
{
    using Tile = WsTile<Op, TOK>;
    using Traits = WsOp<Op>;
    // Consumers: warpgroup wg owns weight rows 64 wg .. 64 wg + 63 of the tile.
    int const wg = threadIdx.x >> 7;
    int const warp = (threadIdx.x >> 5) & 3;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int const unit = wg * 4 + warp; // 16-row unit of the tile (SwiGLU: 8 output columns)
    // Shared-memory rows of this lane's two fragment rows (g and g + 8 of its warp's 16).
    int const rowLo = a.ep.swiglu ? unit * 8 + g : unit * 16 + g;
    int const rowHi = a.ep.swiglu ? 64 + unit * 8 + g : unit * 16 + g + 8;
    WsDecode<Op> decode;
    decode.init(t, a.magicFrag);

    float acc[Tile::kACC];
    uint32_t af0[4][4];
    uint32_t af1[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r)
        {
            af0[kk][r] = 0u;
            af1[kk][r] = 0u;
        }
#pragma unroll
    for (int i = 0; i < Tile::kACC; ++i)
    {
        acc[i] = 0.0f;
    }

    int stage = 0;
    uint32_t phase = 0;
    int prevStage = 0;
    // One k tile: wait for its stage, decode into `cur`, issue its 4 wgmmas (the first of a tile
    // overwrites the accumulators), then retire k tile kt - 1 and hand its stage back.
    auto step = [&](int kt, uint32_t(&cur)[4][4], uint32_t(&prev)[4][4]) {
        mbarWait(fullBar + 8 * stage, phase);
        uint32_t const sx = base + stage * Tile::kSTAGE_BYTES;
        decode.run(cur, baseGeneric + stage * Tile::kSTAGE_BYTES + Tile::kX_BYTES, rowLo, rowHi);
        wsPin(acc);
        // Descriptors before the fence: ptxas serializes a wgmma group whose inputs are defined
        // inside it. k step kk reads 32 bytes into each 128-byte X row (16 bf16 / 32 e4m3 columns).
        uint64_t desc[4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
        {
            desc[kk] = wsDesc(sx + kk * 32);
        }
        wgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
        {
            wgmmaRS<typename Traits::Mma, TOK>(acc, cur[kk], desc[kk], (kt | kk) != 0 ? 1u : 0u);
        }
        wgmmaCommit();
        wgmmaWait<1>();
        if (kt > 0)
        {
            mbarArrive(emptyBar + 8 * prevStage);
        }
        wsPin(prev);
        prevStage = stage;
        if (++stage == Tile::kSTAGES)
        {
            stage = 0;
            phase ^= 1u;
        }
    };

    EpilogueOp const& ep = a.ep;
    for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x)
    {
        int32_t const fb = static_cast<int32_t>(tile % a.featTiles);
        int64_t const tok0 = tile / a.featTiles * TOK;
        // Pairs of k tiles, then the odd one: every path into a decode has retired that register
        // set's last group (a conditional second step inside the loop would let ptxas see a path
        // where it has not, and it would serialize all wgmmas).
        int kt = 0;
        for (; kt + 1 < a.kTiles; kt += 2)
        {
            step(kt, af0, af1);
            step(kt + 1, af1, af0);
        }
        if (kt < a.kTiles)
        {
            step(kt, af0, af1);
        }
        wgmmaWait<0>();
        mbarArrive(emptyBar + 8 * prevStage);
        wsPin(af0);
        wsPin(af1);
        wsPin(acc);

        // Accumulator 4j + e: fragment row g (e < 2) or g + 8 (e >= 2), token tok0 + 8j + 2t + (e & 1).
        if (!ep.swiglu)
        {
            int32_t const f0 = fb * kWS_ROWS + unit * 16 + g;
            int32_t const f1 = f0 + 8;
            bool const ok0 = f0 < a.n;
            bool const ok1 = f1 < a.n;
            float const s0 = ok0 ? ep.featureScale(f0) : 0.0f;
            float const s1 = ok1 ? ep.featureScale(f1) : 0.0f;
            float const b0 = ok0 ? ep.featureBias(f0) : 0.0f;
            float const b1 = ok1 ? ep.featureBias(f1) : 0.0f;
#pragma unroll
            for (int j = 0; j < TOK / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                {
                    int64_t const tok = tok0 + j * 8 + 2 * t + e;
                    if (tok < a.m)
                    {
                        float const ts = ep.tokenScale(tok);
                        if (ok0)
                        {
                            ep.store(tok, f0, EpilogueOp::finish(acc[4 * j + e], ts, s0, b0));
                        }
                        if (ok1)
                        {
                            ep.store(tok, f1, EpilogueOp::finish(acc[4 * j + 2 + e], ts, s1, b1));
                        }
                    }
                }
        }
        else
        {
            int32_t const col = fb * (kWS_ROWS / 2) + unit * 8 + g;
            if (col < ep.halfRows)
            {
                int32_t const up = ep.halfRows + col;
                float const sg = ep.featureScale(col);
                float const su = ep.featureScale(up);
                float const bg = ep.featureBias(col);
                float const bu = ep.featureBias(up);
#pragma unroll
                for (int j = 0; j < TOK / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                    {
                        int64_t const tok = tok0 + j * 8 + 2 * t + e;
                        if (tok < a.m)
                        {
                            float const ts = ep.tokenScale(tok);
                            float const gv = EpilogueOp::finish(acc[4 * j + e], ts, sg, bg);
                            float const uv = EpilogueOp::finish(acc[4 * j + 2 + e], ts, su, bu);
                            ep.store(tok, col, silu(gv) * uv);
                        }
                    }
            }
        }
    }
}
#endif

template <typename Op, int TOK>
__global__ void __launch_bounds__(kWS_THREADS, 1)
    wsKernel(__grid_constant__ CUtensorMap const xMap, __grid_constant__ CUtensorMap const wMap, WsArgs const a)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Tile = WsTile<Op, TOK>;
    using Traits = WsOp<Op>;
    extern __shared__ char smemRaw[];
    uint32_t const base = (smemAddress(smemRaw) + 1023u) & ~1023u;
    char* const baseGeneric = smemRaw + (base - smemAddress(smemRaw));
    uint32_t const fullBar = base + Tile::kSTAGES * Tile::kSTAGE_BYTES; // kSTAGES x 8 bytes
    uint32_t const emptyBar = fullBar + Tile::kSTAGES * 8;

    if (threadIdx.x == 0)
    {
        for (int s = 0; s < Tile::kSTAGES; ++s)
        {
            mbarInit(fullBar + 8 * s, 1);
            mbarInit(emptyBar + 8 * s, kWS_CONSUMERS);
        }
        fenceMbarrierInit();
    }
    __syncthreads(); // the last CTA-wide barrier: from here on the roles only meet at mbarriers

    if (threadIdx.x >= kWS_CONSUMERS)
    {
        setMaxRegisters<kWS_PRODUCER_REGS, false>();
        // Producer: one thread walks the same tiles and k tiles as the consumers, one stage ahead
        // of them per free slot of the ring.
        if (threadIdx.x == kWS_CONSUMERS)
        {
            int stage = 0;
            uint32_t phase = 0;
            for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x)
            {
                int32_t const fb = static_cast<int32_t>(tile % a.featTiles);
                int32_t const tok0 = static_cast<int32_t>(tile / a.featTiles) * TOK;
                for (int kt = 0; kt < a.kTiles; ++kt)
                {
                    mbarWait(emptyBar + 8 * stage, phase ^ 1u); // a fresh barrier passes parity 1
                    uint32_t const full = fullBar + 8 * stage;
                    uint32_t const dst = base + stage * Tile::kSTAGE_BYTES;
                    mbarArriveExpectTx(full, Tile::kTX_BYTES);
                    tmaLoad2d(dst, &xMap, full, kt * Traits::kBK, tok0);
                    if (a.ep.swiglu)
                    {
                        // 64 gate rows, then the 64 matching up rows (dimension 2 = half).
                        tmaLoad3d(dst + Tile::kX_BYTES, &wMap, full, kt * Traits::kW_BYTES, fb * 64, 0);
                    }
                    else
                    {
                        tmaLoad2d(dst + Tile::kX_BYTES, &wMap, full, kt * Traits::kW_BYTES, fb * kWS_ROWS);
                    }
                    if (++stage == Tile::kSTAGES)
                    {
                        stage = 0;
                        phase ^= 1u;
                    }
                }
            }
        }
    }
    else
    {
        setMaxRegisters<kWS_CONSUMER_REGS, true>();
        wsConsume<Op, TOK>(a, base, baseGeneric, fullBar, emptyBar);
    }
#else
    // This body exists only in the sm_90a SASS, which the launcher runs on compute capability 9.0.
    // Reaching this means the driver JIT-compiled the generic compute_90 PTX for a Hopper GPU
    // (CUDA_FORCE_PTX_JIT=1): fail loudly instead of leaving Y unwritten.
    __trap();
#endif
}


//! cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda);
//! nullptr when the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensorMapEncoder()
{
    static PFN_cuTensorMapEncodeTiled_v12000 const encoder = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult status{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status)
                != cudaSuccess
            || status != cudaDriverEntryPointSuccess)
        {
            return nullptr;
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encoder;
}

template <typename Op, int TOK>
cudaError_t launchWsT(LaunchContext const& ctx, WsArgs a, cudaStream_t stream)
{
    using Tile = WsTile<Op, TOK>;
    using Traits = WsOp<Op>;
    TernaryMatmulParams const& p = ctx.p;
    PFN_cuTensorMapEncodeTiled_v12000 const encode = tensorMapEncoder();
    if (encode == nullptr)
    {
        return launchTensorCore(ctx, stream);
    }
    // X: [M, K] elements, boxes of 128 bytes x TOK rows, 128-byte swizzle (the wgmma B layout).
    CUtensorMap xMap;
    CUtensorMapDataType const xType = std::is_same<Op, E4m3>::value ? CU_TENSOR_MAP_DATA_TYPE_UINT8
        : std::is_same<Op, __half>::value                           ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                    : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    cuuint64_t const xDims[2] = {static_cast<cuuint64_t>(p.k), static_cast<cuuint64_t>(p.m)};
    cuuint64_t const xStrides[1] = {static_cast<cuuint64_t>(p.k) * Traits::kELEM};
    cuuint32_t const xBox[2] = {static_cast<cuuint32_t>(Traits::kBK), static_cast<cuuint32_t>(TOK)};
    cuuint32_t const ones[3] = {1, 1, 1};
    CUresult res = encode(&xMap, xType, 2, const_cast<void*>(p.x), xDims, xStrides, xBox, ones,
        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (res != CUDA_SUCCESS)
    {
        return launchTensorCore(ctx, stream); // a driver that refuses the map: the mma.sync kernel
    }
    // W: bytes [N, K / 4]; boxes of kW_BYTES x 128 rows, or with SwiGLU [2][H][K / 4] boxes of
    // kW_BYTES x 64 rows x both halves (gate rows, then the matching up rows).
    CUtensorMap wMap;
    cuuint64_t const rowBytes = static_cast<cuuint64_t>(p.k) / 4;
    if (a.ep.swiglu)
    {
        cuuint64_t const h = static_cast<cuuint64_t>(a.ep.halfRows);
        cuuint64_t const dims[3] = {rowBytes, h, 2};
        cuuint64_t const strides[2] = {rowBytes, rowBytes * h};
        cuuint32_t const box[3] = {static_cast<cuuint32_t>(Traits::kW_BYTES), kWS_ROWS / 2, 2};
        res = encode(&wMap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<int32_t*>(p.w), dims, strides, box, ones,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    else
    {
        cuuint64_t const dims[2] = {rowBytes, static_cast<cuuint64_t>(p.n)};
        cuuint64_t const strides[1] = {rowBytes};
        cuuint32_t const box[2] = {static_cast<cuuint32_t>(Traits::kW_BYTES), kWS_ROWS};
        res = encode(&wMap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int32_t*>(p.w), dims, strides, box, ones,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    if (res != CUDA_SUCCESS)
    {
        return launchTensorCore(ctx, stream);
    }
    cudaError_t err = configureSmem<wsKernel<Op, TOK>>(Tile::kSMEM_BYTES);
    if (err != cudaSuccess)
    {
        return err;
    }
    a.tiles = static_cast<int64_t>(a.featTiles) * ((p.m + TOK - 1) / TOK);
    a.kTiles = (p.k + Traits::kBK - 1) / Traits::kBK;
    int64_t const grid = a.tiles < ctx.numSMs ? a.tiles : ctx.numSMs;
    wsKernel<Op, TOK><<<static_cast<unsigned>(grid), kWS_THREADS, Tile::kSMEM_BYTES, stream>>>(xMap, wMap, a);
    return cudaGetLastError();
}

//! Wave cost model for the token tile: the busiest SM runs ceil(tiles / SMs) tiles of TOK tokens
//! each, plus about two k tiles' worth of fixed cost per tile (pipeline fill, epilogue). Ties go
//! to 256 tokens (each decoded fragment feeds twice the MMA work).
int wsTokens(int64_t m, int32_t featTiles, int32_t kTiles, int numSMs)
{
    int best = 256;
    double bestCost = 1e300;
    for (int tok : {256, 128})
    {
        int64_t const tiles = static_cast<int64_t>(featTiles) * ((m + tok - 1) / tok);
        int64_t const rounds = (tiles + numSMs - 1) / numSMs;
        double const cost = static_cast<double>(rounds) * tok * (kTiles + 2);
        if (cost < bestCost * 0.999)
        {
            bestCost = cost;
            best = tok;
        }
    }
    return best;
}

} // namespace

cudaError_t launchWgmma(LaunchContext const& ctx, cudaStream_t stream)
{
    // launchWsT hands the call to launchTensorCore where no tensor map can be made, which records tc
    recordKernelPath(KernelPath::kWGMMA);
    TernaryMatmulParams const& p = ctx.p;
    WsArgs a{};
    a.ep = makeEpilogue(p);
    a.m = p.m;
    a.n = p.n;
    a.magicFrag = decodeMagics(p).frag;
    a.featTiles = a.ep.swiglu ? (a.ep.halfRows + kWS_ROWS / 2 - 1) / (kWS_ROWS / 2) : (p.n + kWS_ROWS - 1) / kWS_ROWS;
    bool const fp8 = p.actQuant == ActQuant::kFP8E4M3;
    int const kTiles = (p.k + (fp8 ? 127 : 63)) / (fp8 ? 128 : 64);
    int const tok = wsTokens(p.m, a.featTiles, kTiles, ctx.numSMs);
    // Dispatch table: operand (e4m3 / bf16 / fp16) x token tile (256 / 128).
    if (fp8)
    {
        return tok == 256 ? launchWsT<E4m3, 256>(ctx, a, stream) : launchWsT<E4m3, 128>(ctx, a, stream);
    }
    if (p.dtype == DataType::kBF16)
    {
        return tok == 256 ? launchWsT<__nv_bfloat16, 256>(ctx, a, stream)
                          : launchWsT<__nv_bfloat16, 128>(ctx, a, stream);
    }
    return tok == 256 ? launchWsT<__half, 256>(ctx, a, stream) : launchWsT<__half, 128>(ctx, a, stream);
}

} // namespace kernels
} // namespace terdit
