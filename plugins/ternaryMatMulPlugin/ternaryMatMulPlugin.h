/*
 * TensorRT IPluginV3 adapter for terdit::TernaryMatMul version 1 (README.md beside this file).
 *
 * The adapter is thin: it converts TensorRT's structs for ternaryMatMulLogic.h, which holds every
 * check, and enqueue() calls terdit::launchTernaryMatmul (plugins/kernels/ternaryMatmul.h).
 * Construction and all host-side methods make no CUDA call, so a plugin can be created, queried,
 * cloned and serialized on a machine without a GPU.
 */
#pragma once

#include "ternaryMatMulLogic.h"
#include "ternaryMatmul.h"

#include "NvInferRuntime.h"

#include <string>
#include <vector>

namespace terdit
{
namespace plugin
{

class TernaryMatMulPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit TernaryMatMulPlugin(TernaryMatMulAttrs const& attrs);
    //! Copies the creation state; the serialization view is rebuilt by every getFieldsToSerialize.
    TernaryMatMulPlugin(TernaryMatMulPlugin const&) = default;
    TernaryMatMulPlugin& operator=(TernaryMatMulPlugin const&) = delete;
    ~TernaryMatMulPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kTERNARY_MATMUL_NAME; }
    char const* getPluginVersion() const noexcept override { return kTERNARY_MATMUL_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kTERNARY_MATMUL_NAMESPACE; }

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! act_quant="fp8": quantizes X into the workspace, then runs the e4m3 product; `stage` names the
    //! launch that failed.
    cudaError_t enqueueFp8(TernaryMatmulParams& params, void* workspace, cudaStream_t stream, char const*& stage) const;

    TernaryMatMulAttrs mAttrs;
    //! "K=<k> N=<n>" (+ " act_quant=fp8"): creation state for the timing cache and for engine inspection.
    std::string mDescription;
    //! 3 or 4 (with bias), learnt in configurePlugin / onShapeChange; enqueue is not told.
    int32_t mNbInputs{0};
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class TernaryMatMulPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TernaryMatMulPluginCreator();
    ~TernaryMatMulPluginCreator() override = default;

    char const* getPluginName() const noexcept override { return kTERNARY_MATMUL_NAME; }
    char const* getPluginVersion() const noexcept override { return kTERNARY_MATMUL_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kTERNARY_MATMUL_NAMESPACE; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace plugin
} // namespace terdit

extern "C"
{
//! Entry points looked up by IPluginRegistry::loadLibrary and trtexec --dynamicPlugins; the only
//! symbols the library exports (exports.map).
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
}
