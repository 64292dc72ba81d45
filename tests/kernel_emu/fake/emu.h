// CPU emulation of the CUDA environment the TernaryMatMul kernels are written against, so the
// real kernel sources (plugins/kernels) can be compiled with g++ and run on a machine without a
// GPU: each CTA runs as blockDim.x OS threads with real barriers; warp- and warpgroup-collective
// instructions (mma.sync, ldmatrix, wgmma) rendezvous their lanes and apply the PTX ISA fragment
// layouts; cp.async copies land only when the matching cp.async.wait_group retires them, and
// wgmma.mma_async runs only when a wgmma.wait_group retires its group (with checks that nothing
// it reads or writes was touched in between); dynamic
// shared memory starts poisoned; vector accesses check their alignment. It checks the kernels'
// index math and data flow under these models of the instructions, not the hardware itself.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
#define __CUDA_ARCH_FEAT_SM90_ALL 1

// ---- runtime types -------------------------------------------------------------------------

enum cudaError_t
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNotSupported = 801,
    cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
using cudaStream_t = void*;

enum cudaDeviceAttr
{
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
};

enum cudaFuncAttribute
{
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) uint4
{
    unsigned x, y, z, w;
};
struct alignas(8) uint2
{
    unsigned x, y;
};
struct alignas(8) float2
{
    float x, y;
};
struct alignas(16) float4
{
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---- fp16 / bf16 -----------------------------------------------------------------------------

struct __half
{
    uint16_t bits;
};
struct __half2
{
    __half x, y;
};
struct __nv_bfloat16
{
    uint16_t bits;
};
struct __nv_bfloat162
{
    __nv_bfloat16 x, y;
};

namespace emu
{
inline float bitsToFloat(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t floatToBits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float halfToFloat(uint16_t h)
{
    uint32_t const sign = (h & 0x8000u) << 16;
    uint32_t const exp = (h >> 10) & 0x1F;
    uint32_t const man = h & 0x3FF;
    if (exp == 0)
    {
        return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(man), -24);
    }
    if (exp == 31)
    {
        return bitsToFloat(sign | 0x7F800000u | (man << 13));
    }
    return bitsToFloat(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t floatToHalf(float f) // round to nearest even
{
    uint32_t const u = floatToBits(f);
    uint32_t const sign = (u >> 16) & 0x8000u;
    if (std::isnan(f))
    {
        return static_cast<uint16_t>(sign | 0x7E00u);
    }
    float const a = std::fabs(f);
    if (a >= 65520.0f)
    {
        return static_cast<uint16_t>(sign | 0x7C00u);
    }
    if (a < 6.103515625e-05f) // subnormal: multiples of 2^-24
    {
        float const q = std::nearbyint(a * 16777216.0f);
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
    }
    int e;
    float const m = std::frexp(a, &e); // a = m * 2^e, m in [0.5, 1)
    float const q = std::nearbyint(std::ldexp(m, 11)); // 11 significant bits
    uint32_t bits = (static_cast<uint32_t>(e - 1 + 15) << 10) + (static_cast<uint32_t>(q) - 1024u);
    return static_cast<uint16_t>(sign | bits);
}
inline float bf16ToFloat(uint16_t h)
{
    return bitsToFloat(static_cast<uint32_t>(h) << 16);
}
inline uint16_t floatToBf16(float f)
{
    uint32_t u = floatToBits(f);
    if (std::isnan(f))
    {
        return static_cast<uint16_t>((u >> 16) | 0x40u);
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}
//! float -> e4m3 (e4m3fn: bias 7, no infinity, 0x7F NaN), round to nearest even, saturating at
//! +-448 (cvt.rn.satfinite.e4m3x2.f32).
inline uint8_t floatToE4m3(float f)
{
    if (std::isnan(f))
    {
        return 0x7F;
    }
    uint8_t const sign = std::signbit(f) ? 0x80 : 0x00;
    float const a = std::fabs(f);
    if (a >= 448.0f)
    {
        return sign | 0x7E;
    }
    if (a < 0.015625f) // below 2^-6: subnormal steps of 2^-9; q = 8 is the smallest normal, bits 0x08
    {
        return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
    }
    int ex;
    float const m = std::frexp(a, &ex); // a = m 2^ex, m in [0.5, 1)
    int e = ex - 1;                      // a = (2m) 2^e, 2m in [1, 2)
    int q = static_cast<int>(std::nearbyint((2.0f * m - 1.0f) * 8.0f));
    if (q == 8)
    {
        q = 0;
        ++e;
    }
    int const bits = ((e + 7) << 3) | q;
    return sign | static_cast<uint8_t>(bits > 0x7E ? 0x7E : bits);
}
inline float e4m3ToFloat(uint8_t b)
{
    if ((b & 0x7F) == 0x7F)
    {
        return std::nanf("");
    }
    int const e = (b >> 3) & 0xF;
    int const m = b & 7;
    float const v = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
    return (b & 0x80) ? -v : v;
}
} // namespace emu

inline float __half2float(__half h) { return emu::halfToFloat(h.bits); }
inline __half __float2half_rn(float f) { return __half{emu::floatToHalf(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16ToFloat(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::floatToBf16(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi)
{
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __hsub2(__half2 a, __half2 b)
{
    return __floats2half2_rn(__half2float(a.x) - __half2float(b.x), __half2float(a.y) - __half2float(b.y));
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b)
{
    return __floats2bfloat162_rn(
        __bfloat162float(a.x) - __bfloat162float(b.x), __bfloat162float(a.y) - __bfloat162float(b.y));
}

inline float __int_as_float(int i)
{
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    uint8_t b[8];
    for (int i = 0; i < 4; ++i)
    {
        b[i] = static_cast<uint8_t>(x >> (8 * i));
        b[4 + i] = static_cast<uint8_t>(y >> (8 * i));
    }
    unsigned r = 0;
    for (int i = 0; i < 4; ++i)
    {
        r |= static_cast<unsigned>(b[(s >> (4 * i)) & 7u]) << (8 * i);
    }
    return r;
}

// ---- the thread model ------------------------------------------------------------------------

namespace emu
{

[[noreturn]] inline void fail(char const* what)
{
    std::fprintf(stderr, "kernel emulator: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

//! One CTA in flight: its barriers, its dynamic shared memory, lane rendezvous slots.
struct Cta
{
    explicit Cta(unsigned threads, size_t smemBytes)
        : block(static_cast<std::ptrdiff_t>(threads))
        , smem(smemBytes + 1024, 0xFF)
    {
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
        {
            warps.emplace_back(std::make_unique<std::barrier<>>(32));
        }
        for (unsigned w = 0; w < (threads + 127) / 128; ++w)
        {
            groups.emplace_back(std::make_unique<std::barrier<>>(128));
        }
        slots.resize(threads);
    }
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::unique_ptr<std::barrier<>>> groups;
    std::vector<uint8_t> smem; //!< poisoned; base aligned to 1024 below
    struct Slot
    {
        uint32_t u[8];
        uint64_t desc;
        void* ptr;
    };
    std::vector<Slot> slots;
    //! mbarrier state by shared-memory address (the 8 bytes themselves stay poison: kernels may
    //! only touch a barrier through the mbarrier instructions).
    struct Mbar
    {
        int count = 0;
        int pending = 0;
        int64_t tx = 0;
        uint32_t phase = 0; //!< completed phases
    };
    std::mutex mbarMutex;
    std::map<uint32_t, Mbar> mbars;
    //! Bulk tensor copies issued and not yet landed (they land when a thread waits on their barrier).
    struct Bulk
    {
        uint8_t map[128];
        int32_t coords[5];
        uint32_t dst;
        uint32_t bar;
    };
    std::vector<Bulk> bulk;
    uint8_t* smemBase() { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem.data()) + 1023) & ~uintptr_t(1023)); }
};

struct PendingCopy
{
    uint8_t* dst;
    uint8_t const* src;
    uint32_t bytes;
    uint32_t srcBytes;
    int group;
};

//! One wgmma.mma_async in flight (issued, not yet retired by a wgmma.wait_group). It is performed
//! when it retires: A is re-read then from the caller's array (when passed as one) and must equal
//! its value at issue, the accumulators must be untouched since issue, and the B tile in shared
//! memory must read the same at issue and at retirement; any difference is a race in the kernel.
struct PendingMma
{
    float* d;
    int nAcc;             //!< accumulators per thread (N / 2)
    int kind;             //!< 0 bf16, 1 fp16, 2 e4m3
    uint32_t const* aRef; //!< the caller's A array, or nullptr when A was passed by value
    uint32_t a[4];        //!< A at issue
    uint64_t desc;
    bool accumulate = true; //!< false: D = A B^T (scale-d = 0)
    int group = -1;       //!< commit group, -1 until wgmma.commit_group
    bool checkD = false;  //!< the first in-flight wgmma on these accumulators keeps their snapshot
    std::vector<float> dSnap;
    std::vector<uint8_t> bSnap; //!< B tile at issue (warpgroup leader only)
};

struct ThreadState
{
    dim3 thread;
    dim3 blockId;
    dim3 blockSize;
    dim3 gridSize;
    Cta* cta = nullptr;
    std::vector<PendingCopy> pending;
    int committed = 0;
    std::vector<PendingMma> mmas;
    int mmaGroups = 0;
    bool mmaFenced = false;
};

inline thread_local ThreadState tls;

inline unsigned laneId() { return tls.thread.x & 31u; }
inline unsigned warpId() { return tls.thread.x >> 5; }

inline void syncWarp() { tls.cta->warps[warpId()]->arrive_and_wait(); }
inline void syncGroup() { tls.cta->groups[tls.thread.x >> 7]->arrive_and_wait(); }

inline uint8_t* sharedPtr(uint32_t addr)
{
    Cta* const cta = tls.cta;
    if (addr >= cta->smem.size() - 1024)
    {
        fail("shared-memory access out of the dynamic allocation");
    }
    return cta->smemBase() + addr;
}

inline void* dynamicSmem() { return tls.cta->smemBase(); }

inline uint32_t sharedAddress(void const* p)
{
    uintptr_t const base = reinterpret_cast<uintptr_t>(tls.cta->smemBase());
    uintptr_t const q = reinterpret_cast<uintptr_t>(p);
    if (q < base || q >= base + tls.cta->smem.size() - 1024)
    {
        fail("__cvta_generic_to_shared of a pointer outside dynamic shared memory");
    }
    return static_cast<uint32_t>(q - base);
}

inline void checkAlign(void const* p, uintptr_t n, char const* what)
{
    if (reinterpret_cast<uintptr_t>(p) % n != 0)
    {
        fail(what);
    }
}

// ---- launch plumbing -------------------------------------------------------------------------

inline std::mutex gMutex;
inline cudaError_t gLastError = cudaSuccess;
inline std::map<void const*, int> gMaxDynamicSmem;

inline int envInt(char const* name, int fallback)
{
    char const* v = std::getenv(name);
    return v ? std::atoi(v) : fallback;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A const&... args)
{
    int maxSmem = 48 * 1024;
    {
        std::lock_guard<std::mutex> lock(gMutex);
        auto it = gMaxDynamicSmem.find(reinterpret_cast<void const*>(kernel));
        if (it != gMaxDynamicSmem.end())
        {
            maxSmem = it->second;
        }
    }
    if (block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 || grid.y == 0
        || grid.y > 65535 || grid.z != 1 || smem > static_cast<size_t>(maxSmem))
    {
        std::lock_guard<std::mutex> lock(gMutex);
        gLastError = cudaErrorInvalidConfiguration;
        return;
    }
    for (unsigned by = 0; by < grid.y; ++by)
    {
        for (unsigned bx = 0; bx < grid.x; ++bx)
        {
            Cta cta(block.x, smem);
            std::vector<std::thread> threads;
            threads.reserve(block.x);
            for (unsigned tx = 0; tx < block.x; ++tx)
            {
                threads.emplace_back([&, tx, bx, by]() {
                    tls = ThreadState{};
                    tls.thread = dim3(tx);
                    tls.blockId = dim3(bx, by);
                    tls.blockSize = block;
                    tls.gridSize = grid;
                    tls.cta = &cta;
                    kernel(args...);
                    if (!tls.mmas.empty())
                    {
                        fail("kernel exited with wgmma.mma_async not retired by wgmma.wait_group");
                    }
                    if (!tls.pending.empty())
                    {
                        fail("kernel exited with cp.async copies not waited for");
                    }
                    tls.cta = nullptr;
                });
            }
            for (auto& th : threads)
            {
                th.join();
            }
            if (!cta.bulk.empty())
            {
                fail("kernel exited with bulk tensor copies nobody waited for");
            }
        }
    }
}

} // namespace emu

#define threadIdx (::emu::tls.thread)
#define blockIdx (::emu::tls.blockId)
#define blockDim (::emu::tls.blockSize)
#define gridDim (::emu::tls.gridSize)

inline void __syncthreads() { emu::tls.cta->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu::syncWarp(); }

//! __shfl_xor_sync over all 32 lanes (the only form the kernels use).
inline float __shfl_xor_sync(unsigned mask, float v, int offset)
{
    if (mask != 0xFFFFFFFFu)
    {
        emu::fail("__shfl_xor_sync with a partial mask");
    }
    auto& slots = emu::tls.cta->slots;
    unsigned const base = emu::warpId() * 32;
    unsigned const lane = emu::laneId();
    std::memcpy(&slots[base + lane].u[6], &v, 4);
    emu::syncWarp();
    float r;
    std::memcpy(&r, &slots[base + (lane ^ static_cast<unsigned>(offset))].u[6], 4);
    emu::syncWarp();
    return r;
}

inline size_t __cvta_generic_to_shared(void const* p) { return emu::sharedAddress(p); }

// ---- runtime API -----------------------------------------------------------------------------

inline cudaError_t cudaGetLastError()
{
    std::lock_guard<std::mutex> lock(emu::gMutex);
    cudaError_t const e = emu::gLastError;
    emu::gLastError = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::gLastError; }
inline cudaError_t cudaGetDevice(int* d)
{
    *d = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int)
{
    if (attr == cudaDevAttrMultiProcessorCount)
    {
        *v = emu::envInt("TERDIT_EMU_SMS", 4);
        return cudaSuccess;
    }
    if (attr == cudaDevAttrComputeCapabilityMajor)
    {
        *v = emu::envInt("TERDIT_EMU_CC_MAJOR", 9);
        return cudaSuccess;
    }
    if (attr == cudaDevAttrComputeCapabilityMinor)
    {
        *v = emu::envInt("TERDIT_EMU_CC_MINOR", 0);
        return cudaSuccess;
    }
    return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value)
{
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > 227 * 1024)
    {
        return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(emu::gMutex);
    emu::gMaxDynamicSmem[reinterpret_cast<void const*>(kernel)] = value;
    return cudaSuccess;
}
inline char const* cudaGetErrorString(cudaError_t e)
{
    switch (e)
    {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
    }
}
