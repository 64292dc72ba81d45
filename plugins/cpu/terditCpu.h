/*
 * terdit CPU kernels: Y = X @ (scale * T)^T + bias for ternary T in the k16 layout (the
 * terdit::TernaryMatMul contract, design notes in plugins/cpu/README.md), on any CPU.
 *
 * Plain C ABI, no framework: the ONNX Runtime custom op (terditOrt.cpp) and the PyTorch
 * binding (terdit/kernels/cpu_ops.py, through ctypes) are thin adapters over these functions.
 *
 * Activation modes (node attribute act_quant):
 *   0 "none": fp32 activations, fp32 sums (the exact contract).
 *   1 "int8": each row of X quantized with s[m] = max(amax_k |X[m, k]|, 1e-12) / 127 and
 *             round-half-even of X / s (true division), int32 sums of the 2-bit codes times those
 *             bytes, Y = ((acc * s[m]) * scale[n]) + bias[n] (terdit/kernels/int8.py is the definition).
 *   2 "fp8":  each row quantized to float8 e4m3 with s[m] = max(amax, 1e-12) / 448 and
 *             dequantized (terdit/kernels/w2a8.py), then the fp32 product.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TERDIT_CPU_ABI_VERSION 1

//! Runs fn(arg, i) for i in [0, count) on some thread pool and returns when all have run.
typedef void (*TerditCpuTask)(void* arg, size_t index);
typedef void (*TerditCpuParallelFor)(void* ctx, TerditCpuTask fn, void* arg, size_t count);

enum TerditCpuStatus
{
    kTERDIT_CPU_OK = 0,
    kTERDIT_CPU_BAD_ARGUMENT = 1,
    kTERDIT_CPU_BAD_ACT_QUANT = 2,
    kTERDIT_CPU_OUT_OF_MEMORY = 3,
    kTERDIT_CPU_ISA_UNSUPPORTED = 4,
};

//! x fp32 [m, k] (row-major), w int32 k16 [n, ceil(k / 16)], scale fp32 [n], bias fp32 [n] or
//! NULL, y fp32 [m, n]. `parallelFor` NULL: the library's own pool with `threads` threads
//! (0: all cores). Returns a TerditCpuStatus.
int terditCpuTernaryMatmul(float const* x, int32_t const* w, float const* scale, float const* bias,
    float* y, int64_t m, int64_t n, int64_t k, int32_t actQuant, int32_t threads,
    TerditCpuParallelFor parallelFor, void* parallelCtx);

//! The int8 quantization of rows (the definition's bytes): xq int8 [m, k], s fp32 [m].
int terditCpuQuantizeRowsInt8(float const* x, int64_t m, int64_t k, int8_t* xq, float* s);

//! The ISA the calls use now: "avx512-vnni", "avx2" or "portable".
char const* terditCpuIsa(void);
//! The best ISA this CPU runs.
char const* terditCpuBestIsa(void);
//! Forces an ISA ("auto" = the best); kTERDIT_CPU_ISA_UNSUPPORTED when this CPU lacks it.
int terditCpuSetIsa(char const* name);

char const* terditCpuStatusString(int status);
int terditCpuAbiVersion(void);

#ifdef __cplusplus
}
#endif
