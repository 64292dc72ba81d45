/*
 * TernaryMatMul kernels: framework-free launcher API.
 *
 *   Y[m, n] = sum_k X[m, k] * T[n, k] * scale[n] + bias[n]                        (kNONE)
 *   Y[m, n] = (sum_k e4m3(X)[m, k] * T[n, k]) * xScale[m] * scale[n] + bias[n]       (kFP8E4M3)
 *
 * T is ternary {-1, 0, +1} in the project's "k16" layout (docs/design.md section 3): an int32 tensor
 * [N, ceil(K / 16)], weight (n, k) in word k / 16 at bits 2 * (k % 16) .. +1, code = w + 1
 * (code 3 never occurs). Accumulation is fp32; the scales and bias are applied in the epilogue.
 * With kFP8E4M3 ("W1.58A8") the activations arrive quantized per token (launchQuantizeRowsE4m3);
 * ternary weights are exact in e4m3, so the products run on FP8 tensor cores where the GPU has
 * them (sm_89+) with the weights still read as 2-bit codes.
 *
 * The TensorRT plugin and the torch binding are thin adapters over this header; input
 * validation (shapes, dtypes, devices) lives in those adapters, the launcher only re-checks the
 * size rules below and returns cudaErrorInvalidValue when they are broken.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace terdit
{

//! Element type of X and Y (scale, bias and xScale are always float32). With
//! ActQuant::kFP8E4M3 it names Y's type only.
enum class DataType : int32_t
{
    kFLOAT = 0,
    kHALF = 1,
    kBF16 = 2,
};

//! Optional fused epilogue.
enum class Epilogue : int32_t
{
    //! Y[m, n] as above, Y is [M, N].
    kNONE = 0,
    //! Fused SwiGLU for a concatenated w1|w3 weight: with H = N / 2,
    //! Y[m, j] = silu(A[m, j]) * A[m, H + j] for j < H, where A is the kNONE result. Y is [M, H].
    kSWIGLU = 1,
};

//! Activation quantization of the product (W1.58A8 when kFP8E4M3).
enum class ActQuant : int32_t
{
    kNONE = 0,     //!< X holds `dtype` values
    kFP8E4M3 = 1,  //!< X holds e4m3 bytes [M, K] (launchQuantizeRowsE4m3), xScale [M] float32
};

//! Which kernel family runs the product. kAUTO picks from the dispatch table (README.md); the
//! others force one family (tests and benchmarks). Whatever is forced, X / Y pointers that are not
//! 16-byte aligned and float32 X (kNONE) run the generic kernel; kWGMMA / kWGMMA2 run tc on GPUs
//! other than sm_90 (and kWGMMA also where W rows are not 16-byte aligned, K % 64 != 0); kFP8E4M3
//! runs wgmma (sm_90), tc (sm_89+) or generic (older GPUs), so kSKINNY with it runs tc there.
enum class KernelPath : int32_t
{
    kAUTO = 0,
    kSKINNY = 1,  //!< small M: weight-streaming mma.sync kernel, split-K inside the CTA
    kTC = 2,      //!< large M: tiled mma.sync kernel with a cp.async pipeline (the sm_80 / sm_89 path)
    kGENERIC = 3, //!< any dtype / alignment: fp32 FFMA kernel (the float32 path)
    kWGMMA = 4,   //!< large M on sm_90a: TMA + mbarrier ring, producer warp, wgmma consumers, persistent
    kWGMMA2 = 5,  //!< the previous sm_90a default (cp.async inside the MMA warps), bf16 / fp16 only;
                  //!< kept for one measured comparison with kWGMMA, then deleted
};

struct TernaryMatmulParams
{
    void const* x{nullptr};       //!< [M, K] row-major, contiguous, `dtype` (kFP8E4M3: e4m3 bytes)
    int32_t const* w{nullptr};    //!< [N, ceil(K / 16)] k16 codes
    float const* scale{nullptr};  //!< [N]
    float const* bias{nullptr};   //!< [N] or nullptr
    void* y{nullptr};             //!< [M, N] (kNONE) or [M, N / 2] (kSWIGLU), `dtype`
    int64_t m{0};                 //!< rows of X; any value >= 0 (0 is a no-op)
    int32_t n{0};                 //!< output features; multiple of 16 (kSWIGLU: multiple of 32)
    int32_t k{0};                 //!< input features; multiple of 16
    DataType dtype{DataType::kBF16};
    Epilogue epilogue{Epilogue::kNONE};
    KernelPath path{KernelPath::kAUTO};
    ActQuant actQuant{ActQuant::kNONE};   //!< kFP8E4M3: x holds e4m3 bytes [M, K], xScale [M] float32
    float const* xScale{nullptr};         //!< per-token scales of x (kFP8E4M3 only)
};

//! Returns cudaSuccess or the first CUDA error; cudaErrorInvalidValue when a size rule is broken.
cudaError_t launchTernaryMatmul(TernaryMatmulParams const& params, cudaStream_t stream);

//! Human-readable reason why `params` is rejected, or nullptr when it is valid.
char const* ternaryMatmulCheck(TernaryMatmulParams const& params);

//! The kernel family that the calling thread's last launchTernaryMatmul launched (kSKINNY, kTC,
//! kGENERIC, kWGMMA or kWGMMA2), after every fallback of the rules above and of the launchers
//! themselves (a driver without the tensor map encoder runs tc instead of wgmma); kAUTO when that
//! call launched nothing (rejected arguments, m == 0, no device). Tests and benchmarks read it to
//! know which path they covered; it is per thread, so calls on other threads do not change it.
KernelPath lastKernelPath() noexcept;

//! Per-token e4m3 quantization: xq[m, k] = e4m3(x[m, k] / s[m]), s[m] = max(amax_k |x[m, k]|, 1e-12) / 448.
//! Round to nearest even, saturating at +-448; a NaN in a row makes its s and all its xq NaN.
//! x is [m, k] row-major in `dtype` (any alignment); xq is [m, k] bytes, xScale [m] float32.
//! Returns cudaErrorInvalidValue for m < 0, k <= 0, an unknown dtype or null pointers (m > 0).
cudaError_t launchQuantizeRowsE4m3(void const* x, DataType dtype, int64_t m, int32_t k,
                                   uint8_t* xq, float* xScale, cudaStream_t stream);

} // namespace terdit
