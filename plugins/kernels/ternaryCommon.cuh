/*
 * Device helpers shared by the TernaryMatMul kernels: element traits, the 2-bit -> bf16 / fp16 /
 * e4m3 decoders, the one epilogue (scales, bias, SwiGLU, output type) and the launch plumbing
 * (PTX wrappers: ternaryPtx.cuh).
 */
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "ternaryMatmul.h"
#include "ternaryPtx.cuh"

namespace terdit
{
namespace kernels
{

//! Weight (n, k) code c in {0, 1, 2} means c - 1; a word of sixteen code-1 values is all zeros.
constexpr uint32_t kZERO_WORD = 0x55555555u;

//! Tag type of e4m3 activations (one byte each; the kernels only move and multiply them).
struct E4m3
{
    uint8_t bits;
};

// ---- element traits ------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float>
{
    __device__ static float toFloat(float v) { return v; }
};

template <>
struct Elem<__half>
{
    __device__ static float toFloat(__half v) { return __half2float(v); }
    //! Two codes c0 (half 0) and c1 (half 1) sitting at mantissa bit p (p = 0, 2, 4) of each half,
    //! OR-ed with kMAGICp, read as B + c; subtracting kOFFSETp = B + 1 leaves c - 1
    //! exactly (the two values are within a factor of two, so the subtraction is exact).
    //! fp16: B = 1024, 256, 64 (ulp 1, 1/4, 1/16 -> code at bit 0, 2, 4 adds exactly c).
    static constexpr uint32_t kMAGIC0 = 0x64006400u, kMAGIC2 = 0x5C005C00u, kMAGIC4 = 0x54005400u;
    static constexpr uint32_t kOFFSET0 = 0x64016401u, kOFFSET2 = 0x5C045C04u, kOFFSET4 = 0x54105410u;
    //! decodeFragPair: half 0 holds its code at bit 0 (B = 1024), half 1 at bit 2 (B = 256).
    static constexpr uint32_t kMAGIC_FRAG = 0x5C006400u, kOFFSET_FRAG = 0x5C046401u;
    __device__ static uint32_t sub2(uint32_t a, uint32_t b)
    {
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

template <>
struct Elem<__nv_bfloat16>
{
    __device__ static float toFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
    //! bf16: B = 128, 32, 8 (7 mantissa bits: ulp 1, 1/4, 1/16 at those exponents).
    static constexpr uint32_t kMAGIC0 = 0x43004300u, kMAGIC2 = 0x42004200u, kMAGIC4 = 0x41004100u;
    static constexpr uint32_t kOFFSET0 = 0x43014301u, kOFFSET2 = 0x42044204u, kOFFSET4 = 0x41104110u;
    //! decodeFragPair: half 0 holds its code at bit 0 (B = 128), half 1 at bit 2 (B = 32).
    static constexpr uint32_t kMAGIC_FRAG = 0x42004300u, kOFFSET_FRAG = 0x42044301u;
    __device__ static uint32_t sub2(uint32_t a, uint32_t b)
    {
        __nv_bfloat162 r
            = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

//! e4m3 value of a byte (exact; the generic kernel's decode of quantized activations).
__device__ __forceinline__ float e4m3ToFloat(uint32_t b)
{
    uint32_t const e = (b >> 3) & 0xFu;
    uint32_t const mant = b & 7u;
    float v;
    if ((b & 0x7Fu) == 0x7Fu)
    {
        v = __int_as_float(0x7FC00000); // e4m3fn has no infinity: 0x7F / 0xFF are NaN
    }
    else if (e == 0)
    {
        v = static_cast<float>(mant) * 0.001953125f; // subnormal: mant * 2^-9
    }
    else
    {
        v = __int_as_float(static_cast<int>(((e + 120u) << 23) | (mant << 20)));
    }
    return (b & 0x80u) ? -v : v;
}

// ---- decoders --------------------------------------------------------------------------------

//! Decode constants as kernel arguments. LOP3 takes one 32-bit immediate, so `(w & mask) | magic`
//! is one instruction only when the magic sits in a register; a compile-time magic is folded
//! into an immediate by ptxas (whatever the source does to hide it) and every decoded pair costs
//! two LOP3s. A kernel argument is a run-time value: ptxas loads it into a register once.
struct DecodeMagics
{
    uint32_t m0, m2, m4; //!< decodeWordPairs / decodeAdjacentPair (m0)
    uint32_t frag;       //!< decodeFragPair
};

//! The magics of element type T (host side, into the kernel arguments).
template <typename T>
inline DecodeMagics decodeMagics()
{
    return DecodeMagics{Elem<T>::kMAGIC0, Elem<T>::kMAGIC2, Elem<T>::kMAGIC4, Elem<T>::kMAGIC_FRAG};
}

//! The magics of the launch's 16-bit element type; zeros for e4m3 (not used there).
inline DecodeMagics decodeMagics(TernaryMatmulParams const& p)
{
    if (p.actQuant == ActQuant::kFP8E4M3)
    {
        return DecodeMagics{};
    }
    return p.dtype == DataType::kHALF ? decodeMagics<__half>() : decodeMagics<__nv_bfloat16>();
}

//! Decodes one k16 word (codes 0..15 of one weight row) into eight packed pairs. Pair j holds the
//! weights of columns pairLo(j) (half 0) and pairLo(j) + 8 (half 1). Each pair is one mask-OR
//! (LOP3, magic in a register) and one packed subtract (HFMA2 with an immediate) because the two
//! codes are exactly 16 bits apart; only three shifts are needed per word. Callers must feed the
//! matching activations (see pairLo).
//!   j : 0      1      2       3       4       5       6       7
//!       (0,8)  (1,9)  (2,10)  (4,12)  (5,13)  (6,14)  (3,11)  (7,15)
template <typename T>
__device__ __forceinline__ void decodeWordPairs(uint32_t w, DecodeMagics const& mg, uint32_t (&d)[8])
{
    uint32_t const w8 = w >> 8;
    uint32_t const w6 = w >> 6;
    uint32_t const w14 = w >> 14;
    d[0] = Elem<T>::sub2((w & 0x00030003u) | mg.m0, Elem<T>::kOFFSET0);
    d[1] = Elem<T>::sub2((w & 0x000C000Cu) | mg.m2, Elem<T>::kOFFSET2);
    d[2] = Elem<T>::sub2((w & 0x00300030u) | mg.m4, Elem<T>::kOFFSET4);
    d[3] = Elem<T>::sub2((w8 & 0x00030003u) | mg.m0, Elem<T>::kOFFSET0);
    d[4] = Elem<T>::sub2((w8 & 0x000C000Cu) | mg.m2, Elem<T>::kOFFSET2);
    d[5] = Elem<T>::sub2((w8 & 0x00300030u) | mg.m4, Elem<T>::kOFFSET4);
    d[6] = Elem<T>::sub2((w6 & 0x00030003u) | mg.m0, Elem<T>::kOFFSET0);
    d[7] = Elem<T>::sub2((w14 & 0x00030003u) | mg.m0, Elem<T>::kOFFSET0);
}

//! Low column of pair j produced by decodeWordPairs: 0, 1, 2, 4, 5, 6, 3, 7.
__host__ __device__ constexpr int pairLo(int j)
{
    return j < 3 ? j : (j < 6 ? j + 1 : (j == 6 ? 3 : 7));
}

//! Two adjacent codes (bits 0-1 and 2-3 of `nibble`, higher bits ignored) -> a packed pair
//! (weight of the lower column in half 0). Used where the activations come from ldmatrix, which
//! hands out adjacent columns. `magic0` = Elem<T>::kMAGIC0 (a kernel argument, see DecodeMagics).
template <typename T>
__device__ __forceinline__ uint32_t decodeAdjacentPair(uint32_t nibble, uint32_t magic0)
{
    uint32_t const x = nibble & 0xFu;
    // x | x << 14: code 0 stays at bits 0-1, code 1 lands at bits 16-17 (bits 2-3 and 14-15
    // hold copies that the mask drops).
    uint32_t const v = ((x | (x << 14)) & 0x00030003u) | magic0;
    return Elem<T>::sub2(v, Elem<T>::kOFFSET0);
}

//! Byte-permute selector for decodeFragPair: byte b of the (shifted) word into bytes 0 and 2 of
//! the result, zeros in bytes 1 and 3.
__host__ __device__ constexpr uint32_t fragSelector(uint32_t b)
{
    return 0x4040u | b | (b << 8);
}

//! An mma / wgmma A-fragment register (columns c, c + 1 of one row, c even; codes at bits 2c ..
//! 2c + 3 of the k16 word) in three instructions: `x` is the word shifted right by
//! 4 * ((c / 2) & 1), so the two codes sit in bits 0-3 of byte c / 4 of x; `sel` =
//! fragSelector(c / 4) copies that byte into bytes 0 and 2; the mask keeps code c at bit 0 of
//! half 0 and code c + 1 at bit 2 of half 1 (bits 18-19), and the per-half magic / offset pair
//! turns both into code - 1 exactly (see Elem). For lane t of an m16n8k16 / m64nNk16 A fragment:
//! c = 2t (registers 0, 1) and 2t + 8 (registers 2, 3), one shift by 4 * (t & 1) per word.
//! `magic` = Elem<T>::kMAGIC_FRAG (a kernel argument, see DecodeMagics).
template <typename T>
__device__ __forceinline__ uint32_t decodeFragPair(uint32_t x, uint32_t sel, uint32_t magic)
{
    uint32_t const v = (__byte_perm(x, 0u, sel) & 0x000C0003u) | magic;
    return Elem<T>::sub2(v, Elem<T>::kOFFSET_FRAG);
}

//! e4m3 bytes of the three codes, as a byte-permute table: code 0 -> 0xB8 (-1.0: sign, exponent
//! 7 = bias, mantissa 0), 1 -> 0x00 (+0), 2 -> 0x38 (+1.0). Ternary weights are exact in e4m3.
constexpr uint32_t kE4M3_LUT = 0x003800B8u;

//! Byte-permute selector of decodeE4m3Quads for lane t: byte t of word A into bytes 0 and 1,
//! byte t of word B into bytes 2 and 3.
__host__ __device__ constexpr uint32_t quadSelector(uint32_t t)
{
    return t | (t << 4) | ((4u + t) << 8) | ((4u + t) << 12);
}

//! The 8-bit fragment registers of mma.m16n8k32 (B) and wgmma k32 (A): lane t holds columns
//! 4t .. 4t + 3 of a 16-column half, i.e. the four codes of byte t of that half's k16 word, as
//! four e4m3 bytes in column order. Two words (A, B: the two halves, or two rows) per call:
//! one byte permute gathers byte t of each (twice), two shift + mask steps spread the eight
//! 2-bit codes into the eight nibbles of a selector, and a byte permute through kE4M3_LUT (`lut`,
//! in a register) per quad emits the bytes: 9 instructions per 8 weights, no table in memory.
__device__ __forceinline__ void decodeE4m3Quads(uint32_t wA, uint32_t wB, uint32_t sel, uint32_t lut,
    uint32_t& qA, uint32_t& qB)
{
    uint32_t const r = __byte_perm(wA, wB, sel); // [A_t, A_t, B_t, B_t]
    // Nibbles c1c0 of A_t to bits 0-3, c3c2 (the high nibble of the copy in byte 1) to bits 8-11;
    // B likewise at bits 16-19 / 24-27. The other bits are never read below.
    uint32_t const u = (r & 0x000F000Fu) | ((r >> 4) & ~0x000F000Fu);
    // One code per nibble: c0 bits 0-1, c1 bits 4-5, c2 bits 8-9, c3 bits 12-13 (B: +16); bits 2-3
    // of every nibble are zero, so each selects byte `code` of the table.
    uint32_t const v = (u & 0x03030303u) | ((u << 2) & 0x30303030u);
    qA = __byte_perm(lut, 0u, v);
    qB = __byte_perm(lut, 0u, v >> 16);
}

__device__ __forceinline__ uint32_t smemAddress(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ float silu(float v)
{
    return v / (1.0f + expf(-v));
}

// ---- the epilogue (every kernel) -------------------------------------------------------------

//! Everything the epilogue of any kernel needs. For output feature f of token m with fp32 sum
//! `acc`: v = acc * tokenScale(m) * scale[f] + bias[f] (tokenScale = xScale[m] for W1.58A8, else
//! 1); SwiGLU writes silu(v_gate) * v_up at column f of [M, N / 2]; the result is stored as outType.
struct EpilogueOp
{
    float const* scale;
    float const* bias;
    float const* xScale; //!< nullptr unless W1.58A8
    void* y;
    int32_t n;           //!< weight rows
    int32_t halfRows;    //!< n / 2
    int32_t ldy;         //!< columns of Y: n, or n / 2 with SwiGLU
    DataType outType;
    bool swiglu;

    __device__ __forceinline__ float tokenScale(int64_t tok) const
    {
        return xScale != nullptr ? xScale[tok] : 1.0f;
    }
    __device__ __forceinline__ float featureScale(int32_t f) const { return scale[f]; }
    __device__ __forceinline__ float featureBias(int32_t f) const { return bias != nullptr ? bias[f] : 0.0f; }
    //! acc -> output value of feature f (scale s, bias b) for a token with scale ts.
    __device__ __forceinline__ static float finish(float acc, float ts, float s, float b)
    {
        return acc * ts * s + b;
    }
    //! Stores v at Y[tok, col].
    __device__ __forceinline__ void store(int64_t tok, int32_t col, float v) const
    {
        int64_t const i = tok * ldy + col;
        if (outType == DataType::kBF16)
        {
            static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
        }
        else if (outType == DataType::kHALF)
        {
            static_cast<__half*>(y)[i] = __float2half_rn(v);
        }
        else
        {
            static_cast<float*>(y)[i] = v;
        }
    }
    //! Stores v0, v1 at Y[tok, col], Y[tok, col + 1] (col even: one 4- or 8-byte store).
    __device__ __forceinline__ void storePair(int64_t tok, int32_t col, float v0, float v1) const
    {
        int64_t const i = tok * ldy + col;
        if (outType == DataType::kBF16)
        {
            __nv_bfloat162 const h = __floats2bfloat162_rn(v0, v1);
            *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(y) + i) = h;
        }
        else if (outType == DataType::kHALF)
        {
            __half2 const h = __floats2half2_rn(v0, v1);
            *reinterpret_cast<__half2*>(static_cast<__half*>(y) + i) = h;
        }
        else
        {
            *reinterpret_cast<float2*>(static_cast<float*>(y) + i) = make_float2(v0, v1);
        }
    }
    //! Full epilogue of one output of a kernel that has its sums at hand: feature f (no SwiGLU).
    __device__ __forceinline__ void storeFeature(int64_t tok, int32_t f, float acc, float ts) const
    {
        store(tok, f, finish(acc, ts, featureScale(f), featureBias(f)));
    }
    //! SwiGLU output column col from the gate (row col) and up (row halfRows + col) sums.
    __device__ __forceinline__ void storeSwiglu(int64_t tok, int32_t col, float accGate, float accUp, float ts) const
    {
        int32_t const up = halfRows + col;
        float const g = finish(accGate, ts, featureScale(col), featureBias(col));
        float const u = finish(accUp, ts, featureScale(up), featureBias(up));
        store(tok, col, silu(g) * u);
    }
};

// ---- launch plumbing shared by the kernel files ----------------------------------------------

//! What every launcher gets: the checked params plus facts about the device.
struct LaunchContext
{
    TernaryMatmulParams p;
    int numSMs;
    bool vecW;   //!< W rows are 16-byte aligned (K % 64 == 0 and W 16-byte aligned)
    int ccMajor; //!< compute capability of the current device
    int ccMinor;
};

//! Y's element type: dtype names it in both modes (with kFP8E4M3 X is e4m3 whatever dtype is).
inline EpilogueOp makeEpilogue(TernaryMatmulParams const& p)
{
    EpilogueOp e{};
    e.scale = p.scale;
    e.bias = p.bias;
    e.xScale = p.actQuant == ActQuant::kFP8E4M3 ? p.xScale : nullptr;
    e.y = p.y;
    e.n = p.n;
    e.halfRows = p.n / 2;
    e.swiglu = p.epilogue == Epilogue::kSWIGLU;
    e.ldy = e.swiglu ? p.n / 2 : p.n;
    e.outType = p.dtype;
    return e;
}

//! Bytes of one X element: e4m3 activations are one byte, else dtype's size.
inline int64_t xElementBytes(TernaryMatmulParams const& p)
{
    if (p.actQuant == ActQuant::kFP8E4M3)
    {
        return 1;
    }
    return p.dtype == DataType::kFLOAT ? 4 : 2;
}

//! Bytes of one Y element.
inline int64_t yElementBytes(TernaryMatmulParams const& p)
{
    return p.dtype == DataType::kFLOAT ? 4 : 2;
}

//! Raises kKERNEL's dynamic shared-memory limit once per device (the attribute is per device;
//! doing it once keeps the call out of CUDA-graph captures after a warm-up launch). The kernel is
//! a template argument so that every kernel has its own flags (kernels of one signature share a
//! function type).
template <auto kKERNEL>
cudaError_t configureSmem(int bytes)
{
    constexpr int kMAX_DEVICES = 64;
    static bool configured[kMAX_DEVICES] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
    {
        return err;
    }
    if (device >= 0 && device < kMAX_DEVICES && configured[device])
    {
        return cudaSuccess;
    }
    err = cudaFuncSetAttribute(kKERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess && device >= 0 && device < kMAX_DEVICES)
    {
        configured[device] = true;
    }
    return err;
}

//! Notes the family the calling thread's launchTernaryMatmul runs (lastKernelPath()). Every family's
//! launcher calls it first, so one that hands the call to another family (launchWgmma to
//! launchTensorCore) leaves the family that really ran.
void recordKernelPath(KernelPath path) noexcept;

cudaError_t launchGeneric(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchSkinny(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchTensorCore(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchWgmma(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchWgmma2(LaunchContext const& ctx, cudaStream_t stream);

//! Largest M one skinny launch handles (four 8-token MMA tiles).
constexpr int64_t kSKINNY_MAX_M = 32;

} // namespace kernels
} // namespace terdit
