// CPU emulation of the driver-API types the TernaryMatMul sources use (tensor maps for the bulk
// tensor copy engine) and of cuTensorMapEncodeTiled, reached like the real one through
// cudaGetDriverEntryPointByVersion. The encoder applies the driver's documented rules (rank,
// alignment, 16-byte strides, box limits, swizzle span) and stores what the emulated copy needs.
#pragma once
#include "emu.h"

typedef uint64_t cuuint64_t;
typedef uint32_t cuuint32_t;

enum CUresult
{
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
};

enum CUtensorMapDataType
{
    CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0,
    CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6,
    CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9,
};
enum CUtensorMapInterleave
{
    CU_TENSOR_MAP_INTERLEAVE_NONE = 0,
};
enum CUtensorMapSwizzle
{
    CU_TENSOR_MAP_SWIZZLE_NONE = 0,
    CU_TENSOR_MAP_SWIZZLE_32B,
    CU_TENSOR_MAP_SWIZZLE_64B,
    CU_TENSOR_MAP_SWIZZLE_128B,
};
enum CUtensorMapL2promotion
{
    CU_TENSOR_MAP_L2_PROMOTION_NONE = 0,
    CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
    CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
    CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
};
enum CUtensorMapFloatOOBfill
{
    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0,
};

struct alignas(64) CUtensorMap
{
    unsigned long long opaque[16];
};

namespace emu
{
//! What the emulated encoder stores inside a CUtensorMap.
struct TmaDesc
{
    uint8_t const* base;
    uint32_t rank;
    uint32_t elemBytes;
    uint32_t swizzle128;
    uint64_t dims[5];
    uint64_t strides[5]; //!< bytes; strides[0] = elemBytes
    uint32_t box[5];
};
static_assert(sizeof(TmaDesc) <= sizeof(CUtensorMap), "descriptor fits the opaque map");

inline CUresult encodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* global,
    cuuint64_t const* dims, cuuint64_t const* strides, cuuint32_t const* box, cuuint32_t const* elementStrides,
    CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill)
{
    uint32_t const elem = type == CU_TENSOR_MAP_DATA_TYPE_UINT8 ? 1 : 2;
    if (rank < 1 || rank > 5 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE
        || (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B))
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (reinterpret_cast<uintptr_t>(global) % 16 != 0 || reinterpret_cast<uintptr_t>(map) % 64 != 0)
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    TmaDesc d{};
    d.base = static_cast<uint8_t const*>(global);
    d.rank = rank;
    d.elemBytes = elem;
    d.swizzle128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
    d.strides[0] = elem;
    for (uint32_t i = 0; i < rank; ++i)
    {
        if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256 || elementStrides[i] != 1)
        {
            return CUDA_ERROR_INVALID_VALUE;
        }
        d.dims[i] = dims[i];
        d.box[i] = box[i];
        if (i > 0)
        {
            if (strides[i - 1] % 16 != 0 || strides[i - 1] >= (uint64_t(1) << 40))
            {
                return CUDA_ERROR_INVALID_VALUE;
            }
            d.strides[i] = strides[i - 1];
        }
    }
    uint32_t const innerBytes = box[0] * elem;
    if (innerBytes % 16 != 0 || (d.swizzle128 && innerBytes > 128))
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::memset(map, 0, sizeof(*map));
    std::memcpy(map, &d, sizeof(d));
    return CUDA_SUCCESS;
}
} // namespace emu

enum cudaDriverEntryPointQueryResult
{
    cudaDriverEntryPointSuccess = 0,
    cudaDriverEntryPointSymbolNotFound = 1,
};
enum
{
    cudaEnableDefault = 0,
};

inline cudaError_t cudaGetDriverEntryPointByVersion(
    char const* symbol, void** fn, unsigned, unsigned long long, cudaDriverEntryPointQueryResult* status)
{
    if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0)
    {
        *fn = reinterpret_cast<void*>(&emu::encodeTiled);
        *status = cudaDriverEntryPointSuccess;
        return cudaSuccess;
    }
    *fn = nullptr;
    *status = cudaDriverEntryPointSymbolNotFound;
    return cudaSuccess;
}
