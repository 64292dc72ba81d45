/*
 * Device helpers shared by the TernaryMatMul kernels: element traits, the 2-bit -> bf16/fp16
 * decoders and the launch plumbing (PTX wrappers: ternaryPtx.cuh).
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

// ---- element traits ------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float>
{
    __device__ static float toFloat(float v) { return v; }
    __device__ static float fromFloat(float v) { return v; }
};

template <>
struct Elem<__half>
{
    __device__ static float toFloat(__half v) { return __half2float(v); }
    __device__ static __half fromFloat(float v) { return __float2half_rn(v); }
    __device__ static uint32_t pack2(float lo, float hi)
    {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
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
    __device__ static __nv_bfloat16 fromFloat(float v) { return __float2bfloat16_rn(v); }
    __device__ static uint32_t pack2(float lo, float hi)
    {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
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

// ---- decoders --------------------------------------------------------------------------------

//! Decodes one k16 word (codes 0..15 of one weight row) into eight packed pairs. Pair j holds the
//! weights of columns pairLo(j) (half 0) and pairLo(j) + 8 (half 1). Each pair is one mask and
//! one OR of a (shifted) word because the two codes are exactly 16 bits apart; only three shifts
//! are needed per word. Callers must feed the matching activations (see pairLo).
//!   j : 0      1      2       3       4       5       6       7
//!       (0,8)  (1,9)  (2,10)  (4,12)  (5,13)  (6,14)  (3,11)  (7,15)
template <typename T>
__device__ __forceinline__ void decodeWordPairs(uint32_t w, uint32_t (&d)[8])
{
    uint32_t const w8 = w >> 8;
    uint32_t const w6 = w >> 6;
    uint32_t const w14 = w >> 14;
    d[0] = (w & 0x00030003u) | Elem<T>::kMAGIC0;
    d[1] = (w & 0x000C000Cu) | Elem<T>::kMAGIC2;
    d[2] = (w & 0x00300030u) | Elem<T>::kMAGIC4;
    d[3] = (w8 & 0x00030003u) | Elem<T>::kMAGIC0;
    d[4] = (w8 & 0x000C000Cu) | Elem<T>::kMAGIC2;
    d[5] = (w8 & 0x00300030u) | Elem<T>::kMAGIC4;
    d[6] = (w6 & 0x00030003u) | Elem<T>::kMAGIC0;
    d[7] = (w14 & 0x00030003u) | Elem<T>::kMAGIC0;
    d[0] = Elem<T>::sub2(d[0], Elem<T>::kOFFSET0);
    d[1] = Elem<T>::sub2(d[1], Elem<T>::kOFFSET2);
    d[2] = Elem<T>::sub2(d[2], Elem<T>::kOFFSET4);
    d[3] = Elem<T>::sub2(d[3], Elem<T>::kOFFSET0);
    d[4] = Elem<T>::sub2(d[4], Elem<T>::kOFFSET2);
    d[5] = Elem<T>::sub2(d[5], Elem<T>::kOFFSET4);
    d[6] = Elem<T>::sub2(d[6], Elem<T>::kOFFSET0);
    d[7] = Elem<T>::sub2(d[7], Elem<T>::kOFFSET0);
}

//! Low column of pair j produced by decodeWordPairs: 0, 1, 2, 4, 5, 6, 3, 7.
__host__ __device__ constexpr int pairLo(int j)
{
    return j < 3 ? j : (j < 6 ? j + 1 : (j == 6 ? 3 : 7));
}

//! Two adjacent codes (bits 0-1 and 2-3 of `nibble`, higher bits ignored) -> a packed pair
//! (weight of the lower column in half 0). Used where the activations come from ldmatrix, which
//! hands out adjacent columns.
template <typename T>
__device__ __forceinline__ uint32_t decodeAdjacentPair(uint32_t nibble)
{
    uint32_t const x = nibble & 0xFu;
    // x | x << 14: code 0 stays at bits 0-1, code 1 lands at bits 16-17 (bits 2-3 and 14-15
    // hold copies that the mask drops).
    uint32_t const v = ((x | (x << 14)) & 0x00030003u) | Elem<T>::kMAGIC0;
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
template <typename T>
__device__ __forceinline__ uint32_t decodeFragPair(uint32_t x, uint32_t sel)
{
    uint32_t const v = (__byte_perm(x, 0u, sel) & 0x000C0003u) | Elem<T>::kMAGIC_FRAG;
    return Elem<T>::sub2(v, Elem<T>::kOFFSET_FRAG);
}

__device__ __forceinline__ uint32_t smemAddress(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ float silu(float v)
{
    return v / (1.0f + expf(-v));
}

// ---- launch plumbing shared by the kernel files ----------------------------------------------

//! What every launcher gets: the checked params plus facts about the device.
struct LaunchContext
{
    TernaryMatmulParams p;
    int numSMs;
    bool vecW; //!< W rows are 16-byte aligned (K % 64 == 0 and W 16-byte aligned)
    int ccMajor; //!< compute capability of the current device
};

cudaError_t launchGeneric(LaunchContext const& ctx, cudaStream_t stream);
//! `async`: the skinny2 variant (weights through a per-warp cp.async ring; 16-byte aligned W only).
cudaError_t launchSkinny(LaunchContext const& ctx, cudaStream_t stream, bool async = false);
cudaError_t launchTensorCore(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchWgmma(LaunchContext const& ctx, cudaStream_t stream);
cudaError_t launchWgmma2(LaunchContext const& ctx, cudaStream_t stream);

//! Fills the fields every tiled kernel's argument struct shares (host side only; each kernel
//! keeps its own struct, so device code and parameter layout are untouched).
template <typename Args>
inline void fillTileArgs(Args& a, TernaryMatmulParams const& p)
{
    a.x = p.x;
    a.w = reinterpret_cast<uint32_t const*>(p.w);
    a.scale = p.scale;
    a.bias = p.bias;
    a.y = p.y;
    a.n = p.n;
    a.k = p.k;
    a.kw = p.k / 16;
    a.halfRows = p.n / 2;
    a.swiglu = p.epilogue == Epilogue::kSWIGLU;
}

//! Largest M one skinny launch handles (four 8-token MMA tiles).
constexpr int64_t kSKINNY_MAX_M = 32;

} // namespace kernels
} // namespace terdit
