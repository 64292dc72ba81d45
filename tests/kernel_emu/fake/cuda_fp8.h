// CPU emulation of the e4m3 conversion the TernaryMatMul sources use (cvt.rn.satfinite.e4m3x2.f32).
#pragma once
#include "emu.h"

typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_saturation_t
{
    __NV_NOSAT = 0,
    __NV_SATFINITE = 1,
};
enum __nv_fp8_interpretation_t
{
    __NV_E4M3 = 0,
    __NV_E5M2 = 1,
};

//! Low byte: e4m3(v.x), high byte: e4m3(v.y).
inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t sat, __nv_fp8_interpretation_t fmt)
{
    if (sat != __NV_SATFINITE || fmt != __NV_E4M3)
    {
        emu::fail("only the saturating e4m3 conversion is emulated");
    }
    return static_cast<__nv_fp8x2_storage_t>(emu::floatToE4m3(v.x) | (emu::floatToE4m3(v.y) << 8));
}
