/*
 * Test stand-in for libnvinfer.so.<major>, built by tests/test_plugin_matrix.py into a temporary
 * directory (never installed, never shipped). It defines the one symbol a static-registration build
 * of the plugin needs from libnvinfer, getPluginRegistry(), returning a registry that only records
 * registerCreator calls, plus two C functions for the test to read the record.
 *
 * What it lets a test check without TensorRT: CMake finds a versioned soname (libnvinfer.so.10 /
 * .so.11, as pip installs it) and links it; the plugin then loads with a plain dlopen /
 * ctypes.CDLL (what polygraphy --plugins does) and its REGISTER_TENSORRT_PLUGIN registrar reaches
 * registerCreator through the IPluginRegistry vtable of the headers it was compiled with. What it
 * cannot check: anything TensorRT itself does with the creator.
 *
 *   c++ -shared -fPIC -Wl,-soname,libnvinfer.so.<major> -I<TensorRT include> -I<CUDA include> nvinferStub.cpp
 */
#include "NvInferRuntime.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace
{

using namespace nvinfer1;

class RecordingRegistry : public IPluginRegistry
{
public:
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        try
        {
            // "<interface kind>|<name>|<version>|<registrar namespace>|<number of fields>"
            std::string entry = creator.getInterfaceInfo().kind;
            if (entry == "PLUGIN CREATOR_V3ONE")
            {
                auto& v3 = static_cast<IPluginCreatorV3One&>(creator);
                PluginFieldCollection const* fields = v3.getFieldNames();
                entry += std::string{"|"} + v3.getPluginName() + "|" + v3.getPluginVersion() + "|"
                    + (pluginNamespace != nullptr ? pluginNamespace : "<null>") + "|"
                    + std::to_string(fields != nullptr ? fields->nbFields : -1);
            }
            mEntries.push_back(entry);
            return true;
        }
        catch (...)
        {
            return false;
        }
    }

    std::vector<std::string> entries()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mEntries;
    }

    // Everything else is unused by the plugin library and answers "nothing".
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override { *numCreators = 0; return nullptr; }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return -1; }
    // Pure virtual since TensorRT 10.10, absent before (10.0.1, 10.7.0): no override keyword.
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept { *numCreators = 0; return nullptr; }
#if NV_TENSORRT_MAJOR < 11
    // The IPluginV2 creator methods, removed in TensorRT 11.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override { *numCreators = 0; return nullptr; }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
#endif

private:
    std::mutex mMutex;
    std::vector<std::string> mEntries;
};

RecordingRegistry& registry()
{
    // Never destroyed: a plugin library may still hold its creator when the process exits.
    static RecordingRegistry* instance = new RecordingRegistry;
    return *instance;
}

} // namespace

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginRegistry* getPluginRegistry() noexcept
{
    return &registry();
}

//! Number of registerCreator calls so far.
extern "C" __attribute__((visibility("default"))) int32_t terditStubCreatorCount()
{
    return static_cast<int32_t>(registry().entries().size());
}

//! Copies entry `index` into buffer (NUL-terminated, truncated to size); returns its full length or -1.
extern "C" __attribute__((visibility("default"))) int32_t terditStubCreatorEntry(int32_t index, char* buffer, int32_t size)
{
    std::vector<std::string> const entries = registry().entries();
    if (index < 0 || index >= static_cast<int32_t>(entries.size()) || buffer == nullptr || size <= 0)
    {
        return -1;
    }
    std::string const& entry = entries[static_cast<size_t>(index)];
    size_t const n = std::min(entry.size(), static_cast<size_t>(size - 1));
    entry.copy(buffer, n);
    buffer[n] = '\0';
    return static_cast<int32_t>(entry.size());
}
