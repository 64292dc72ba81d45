/*
 * The C ABI of the CPU kernels: ISA dispatch from cpuid, the library's own thread pool (used when
 * the caller brings none), the per-row activation quantization of the int8 and fp8 modes, and
 * argument checks. Kernels are in cpuAvx512.cpp / cpuAvx2.cpp / cpuPortable.cpp.
 */
#include "cpuGemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#define TERDIT_CPU_API extern "C" __attribute__((visibility("default")))

namespace terdit
{
namespace cpu
{
namespace
{

// ---- scratch --------------------------------------------------------------------------------

struct Scratch
{
    std::vector<uint8_t> bytes;
};

// ---- ISA choice ------------------------------------------------------------------------------

bool cpuHas(char const* isa)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (std::strcmp(isa, "avx512-vnni") == 0)
    {
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    if (std::strcmp(isa, "avx2") == 0)
    {
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
    return std::strcmp(isa, "portable") == 0;
}

//! The kernels of `isa` when this build has them and this CPU runs them (checked before any
//! function of an ISA unit is called), else nullptr.
IsaKernels const* kernelsOf(char const* isa)
{
    if (!cpuHas(isa))
    {
        return nullptr;
    }
#if defined(TERDIT_CPU_X86)
    if (std::strcmp(isa, "avx512-vnni") == 0)
    {
        return &avx512Kernels();
    }
    if (std::strcmp(isa, "avx2") == 0)
    {
        return &avx2Kernels();
    }
#endif
    if (std::strcmp(isa, "portable") == 0)
    {
        return &portableKernels();
    }
    return nullptr;
}

char const* const kISAS[] = {"avx512-vnni", "avx2", "portable"}; // best first

IsaKernels const* bestKernels()
{
    for (char const* isa : kISAS)
    {
        IsaKernels const* k = kernelsOf(isa);
        if (k != nullptr)
        {
            return k;
        }
    }
    return &portableKernels();
}

std::atomic<IsaKernels const*> gKernels{nullptr};

IsaKernels const& kernels()
{
    IsaKernels const* k = gKernels.load(std::memory_order_acquire);
    if (k == nullptr)
    {
        char const* forced = std::getenv("TERDIT_CPU_ISA");
        k = forced != nullptr ? kernelsOf(forced) : nullptr;
        k = k != nullptr ? k : bestKernels();
        gKernels.store(k, std::memory_order_release);
    }
    return *k;
}

// ---- the library's own pool --------------------------------------------------------------------

//! A fixed pool of hardware_concurrency - 1 workers; the calling thread works too. One job at a
//! time (callers are serialized). Workers spin briefly after a job (consecutive GEMMs follow each
//! other closely), then sleep.
class Pool
{
public:
    static Pool& instance()
    {
        static Pool pool;
        return pool;
    }

    void run(TerditCpuTask fn, void* arg, size_t count, int32_t threads)
    {
        std::lock_guard<std::mutex> serial(mCallMutex);
        size_t const helpers = std::min<size_t>(mWorkers.size(), static_cast<size_t>(std::max(threads, 1) - 1));
        if (helpers == 0 || count == 1)
        {
            for (size_t i = 0; i < count; ++i)
            {
                fn(arg, i);
            }
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mMutex);
            mFn = fn;
            mArg = arg;
            mCount = count;
            mNext.store(0);
            mHelpers = helpers;
            mBusy.store(helpers);
            mGeneration.fetch_add(1, std::memory_order_release);
        }
        mWake.notify_all();
        work();
        while (mBusy.load(std::memory_order_acquire) != 0)
        {
            std::this_thread::yield();
        }
    }

    int32_t size() const
    {
        return static_cast<int32_t>(mWorkers.size()) + 1;
    }

    ~Pool()
    {
        {
            std::lock_guard<std::mutex> lock(mMutex);
            mStop = true;
            mGeneration.fetch_add(1);
        }
        mWake.notify_all();
        for (auto& t : mWorkers)
        {
            t.join();
        }
    }

private:
    Pool()
    {
        unsigned const n = std::max(1U, std::thread::hardware_concurrency());
        for (unsigned i = 0; i + 1 < n; ++i)
        {
            mWorkers.emplace_back([this, i] { loop(i); });
        }
    }

    void work()
    {
        for (size_t i = mNext.fetch_add(1); i < mCount; i = mNext.fetch_add(1))
        {
            mFn(mArg, i);
        }
    }

    void loop(size_t id)
    {
        uint64_t seen = 0;
        for (;;)
        {
            uint64_t gen = mGeneration.load(std::memory_order_acquire);
            for (int spin = 0; gen == seen && spin < 20000; ++spin)
            {
                std::this_thread::yield();
                gen = mGeneration.load(std::memory_order_acquire);
            }
            if (gen == seen)
            {
                std::unique_lock<std::mutex> lock(mMutex);
                mWake.wait(lock, [&] { return mGeneration.load() != seen; });
                gen = mGeneration.load();
            }
            seen = gen;
            if (mStop)
            {
                return;
            }
            if (id < mHelpers)
            {
                work();
                mBusy.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::vector<std::thread> mWorkers;
    std::mutex mCallMutex;
    std::mutex mMutex;
    std::condition_variable mWake;
    std::atomic<uint64_t> mGeneration{0};
    std::atomic<size_t> mNext{0};
    std::atomic<size_t> mBusy{0};
    TerditCpuTask mFn{nullptr};
    void* mArg{nullptr};
    size_t mCount{0};
    size_t mHelpers{0};
    bool mStop{false};
};

void poolForEach(void* ctx, TerditCpuTask fn, void* arg, size_t count)
{
    Pool::instance().run(fn, arg, count, *static_cast<int32_t*>(ctx));
}

// ---- fp8 (e4m3) rows ---------------------------------------------------------------------------

//! Round to the nearest float8 e4m3 value, ties to even (|v| <= 448 here by construction).
float roundE4m3(float v)
{
    float const a = std::fabs(v);
    if (a < 0.015625F) // below 2^-6: subnormals, quantum 2^-9
    {
        return std::nearbyint(v * 512.0F) / 512.0F;
    }
    int exponent = 0;
    std::frexp(a, &exponent);                           // a = f * 2^exponent, f in [0.5, 1)
    float const quantum = std::ldexp(1.0F, exponent - 4); // 3 mantissa bits
    float const r = std::nearbyint(v / quantum) * quantum;
    return std::fmin(std::fmax(r, -448.0F), 448.0F);
}

//! x -> e4m3(x / s) * s per row, s = max(amax, 1e-12) / 448 (terdit/kernels/w2a8.py, then what
//! DequantizeLinear yields). A row holding NaN or Inf becomes NaN.
void dequantizedE4m3Rows(float const* x, int64_t k, int64_t r0, int64_t r1, float* out)
{
    for (int64_t r = r0; r < r1; ++r)
    {
        float const* xr = x + r * k;
        float* o = out + r * k;
        bool finite = true;
        float const amax = rowAmax(xr, k, finite);
        float const s = (amax > kMIN_AMAX ? amax : kMIN_AMAX) / 448.0F;
        for (int64_t i = 0; i < k; ++i)
        {
            o[i] = finite ? roundE4m3(xr[i] / s) * s : __builtin_nanf("");
        }
    }
}

constexpr int64_t kQUANT_ROWS = 16; // rows per quantization task

int matmul(Gemm const& g, ActQuant mode, Parallel const& par)
{
    IsaKernels const& isa = kernels();
    if (mode == ActQuant::kNONE)
    {
        return isa.gemmF32(g, par);
    }
    size_t const rowTasks = static_cast<size_t>((g.m + kQUANT_ROWS - 1) / kQUANT_ROWS);
    try
    {
        if (mode == ActQuant::kFP8)
        {
            std::vector<float> xd(static_cast<size_t>(g.m * g.k));
            auto quant = [&](size_t t) {
                int64_t const r0 = static_cast<int64_t>(t) * kQUANT_ROWS;
                dequantizedE4m3Rows(g.x, g.k, r0, std::min(g.m, r0 + kQUANT_ROWS), xd.data());
            };
            par.run(rowTasks, quant);
            Gemm gd = g;
            gd.x = xd.data();
            return isa.gemmF32(gd, par);
        }
        int64_t const kp = (g.k + 15) / 16 * 16;
        // 64 bytes of slack: the tiles read whole groups of 4 bytes
        std::vector<int8_t> q(static_cast<size_t>(g.m * kp + 64));
        std::vector<float> s(static_cast<size_t>(g.m));
        std::vector<int32_t> sum(static_cast<size_t>(g.m));
        auto quant = [&](size_t t) {
            int64_t const r0 = static_cast<int64_t>(t) * kQUANT_ROWS;
            isa.quantizeInt8(g.x, g.k, kp, r0, std::min(g.m, r0 + kQUANT_ROWS), q.data(), s.data(), sum.data());
        };
        par.run(rowTasks, quant);
        return isa.gemmInt8(g, Int8Rows{q.data(), s.data(), sum.data(), kp}, par);
    }
    catch (std::bad_alloc const&)
    {
        return kTERDIT_CPU_OUT_OF_MEMORY;
    }
}

} // namespace

void* threadScratch(size_t bytes)
{
    thread_local Scratch scratch;
    try
    {
        if (scratch.bytes.size() < bytes + 64)
        {
            scratch.bytes.resize(bytes + 64);
        }
    }
    catch (std::bad_alloc const&)
    {
        return nullptr;
    }
    auto const addr = reinterpret_cast<uintptr_t>(scratch.bytes.data());
    return reinterpret_cast<void*>((addr + 63) & ~static_cast<uintptr_t>(63));
}

} // namespace cpu
} // namespace terdit

using namespace terdit::cpu;

TERDIT_CPU_API int terditCpuTernaryMatmul(float const* x, int32_t const* w, float const* scale, float const* bias,
    float* y, int64_t m, int64_t n, int64_t k, int32_t actQuant, int32_t threads, TerditCpuParallelFor parallelFor,
    void* parallelCtx)
{
    if (m < 0 || n < 0 || k < 0 || threads < 0)
    {
        return kTERDIT_CPU_BAD_ARGUMENT;
    }
    if (actQuant < 0 || actQuant > 2)
    {
        return kTERDIT_CPU_BAD_ACT_QUANT;
    }
    if (m == 0 || n == 0)
    {
        return kTERDIT_CPU_OK;
    }
    if (x == nullptr || w == nullptr || scale == nullptr || y == nullptr || k == 0)
    {
        return kTERDIT_CPU_BAD_ARGUMENT;
    }
    int32_t poolThreads = 0;
    Parallel par{parallelFor, parallelCtx,
        threads > 0 ? threads : static_cast<int32_t>(std::max(1U, std::thread::hardware_concurrency()))};
    if (parallelFor == nullptr)
    {
        poolThreads = threads == 0 ? Pool::instance().size() : std::min(threads, Pool::instance().size());
        par = Parallel{poolForEach, &poolThreads, poolThreads};
    }
    Gemm const g{x, w, scale, bias, y, m, n, k};
    return matmul(g, static_cast<ActQuant>(actQuant), par);
}

TERDIT_CPU_API int terditCpuQuantizeRowsInt8(float const* x, int64_t m, int64_t k, int8_t* xq, float* s)
{
    if (m < 0 || k <= 0 || x == nullptr || xq == nullptr || s == nullptr)
    {
        return kTERDIT_CPU_BAD_ARGUMENT;
    }
    std::vector<int32_t> sum(static_cast<size_t>(m));
    kernels().quantizeInt8(x, k, k, 0, m, xq, s, sum.data());
    return kTERDIT_CPU_OK;
}

TERDIT_CPU_API char const* terditCpuIsa(void)
{
    return kernels().name;
}

TERDIT_CPU_API char const* terditCpuBestIsa(void)
{
    return bestKernels()->name;
}

TERDIT_CPU_API int terditCpuSetIsa(char const* name)
{
    if (name == nullptr)
    {
        return kTERDIT_CPU_BAD_ARGUMENT;
    }
    if (std::strcmp(name, "auto") == 0)
    {
        gKernels.store(bestKernels());
        return kTERDIT_CPU_OK;
    }
    IsaKernels const* k = kernelsOf(name);
    if (k == nullptr)
    {
        return kTERDIT_CPU_ISA_UNSUPPORTED;
    }
    gKernels.store(k);
    return kTERDIT_CPU_OK;
}

TERDIT_CPU_API char const* terditCpuStatusString(int status)
{
    switch (status)
    {
    case kTERDIT_CPU_OK: return "ok";
    case kTERDIT_CPU_BAD_ARGUMENT: return "bad argument (null pointer or negative size)";
    case kTERDIT_CPU_BAD_ACT_QUANT: return "unsupported act_quant (0 none, 1 int8, 2 fp8)";
    case kTERDIT_CPU_OUT_OF_MEMORY: return "out of memory";
    case kTERDIT_CPU_ISA_UNSUPPORTED: return "this CPU or build lacks that instruction set";
    default: return "unknown status";
    }
}

TERDIT_CPU_API int terditCpuAbiVersion(void)
{
    return TERDIT_CPU_ABI_VERSION;
}
