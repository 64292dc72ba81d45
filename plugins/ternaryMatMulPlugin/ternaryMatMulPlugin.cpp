#include "ternaryMatMulPlugin.h"

#include "ternaryMatMulKernelFeatures.h"
#include "ternaryMatmul.h"

#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <new>
#include <type_traits>

using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

namespace terdit
{
namespace plugin
{
namespace
{

// FieldType mirrors PluginFieldType so a field type converts by value. kINT4 (TensorRT 10.1) and kFP4
// (10.8) are newer than 10.0, so they are compared only where the headers at hand define them (detected,
// not keyed on version numbers); every other enumerator exists in all 10.x and 11.x headers.
template <typename E, typename = void>
struct MirrorsInt4 : std::true_type
{
};
template <typename E>
struct MirrorsInt4<E, std::void_t<decltype(E::kINT4)>>
    : std::integral_constant<bool, static_cast<int32_t>(E::kINT4) == static_cast<int32_t>(FieldType::kINT4)>
{
};
template <typename E, typename = void>
struct MirrorsFp4 : std::true_type
{
};
template <typename E>
struct MirrorsFp4<E, std::void_t<decltype(E::kFP4)>>
    : std::integral_constant<bool, static_cast<int32_t>(E::kFP4) == static_cast<int32_t>(FieldType::kFP4)>
{
};

// FieldType mirrors TensorRT's PluginFieldType value for value (the header releases add kINT4 / kFP4).
#define TERDIT_SAME_FIELD_TYPE(name)                                                               \
    static_assert(static_cast<int32_t>(FieldType::name) == static_cast<int32_t>(PluginFieldType::name), \
        "FieldType::" #name " must equal PluginFieldType::" #name);
TERDIT_SAME_FIELD_TYPE(kFLOAT16)
TERDIT_SAME_FIELD_TYPE(kFLOAT32)
TERDIT_SAME_FIELD_TYPE(kFLOAT64)
TERDIT_SAME_FIELD_TYPE(kINT8)
TERDIT_SAME_FIELD_TYPE(kINT16)
TERDIT_SAME_FIELD_TYPE(kINT32)
TERDIT_SAME_FIELD_TYPE(kCHAR)
TERDIT_SAME_FIELD_TYPE(kDIMS)
TERDIT_SAME_FIELD_TYPE(kUNKNOWN)
TERDIT_SAME_FIELD_TYPE(kBF16)
TERDIT_SAME_FIELD_TYPE(kINT64)
TERDIT_SAME_FIELD_TYPE(kFP8)
#undef TERDIT_SAME_FIELD_TYPE
static_assert(MirrorsInt4<PluginFieldType>::value, "FieldType::kINT4 must equal PluginFieldType::kINT4");
static_assert(MirrorsFp4<PluginFieldType>::value, "FieldType::kFP4 must equal PluginFieldType::kFP4");
static_assert(kMAX_DIMS == nvinfer1::Dims::MAX_DIMS, "");

//! The ILoggerFinder handed over by TensorRT through setLoggerFinder.
class LoggerFinderHolder
{
public:
    void set(nvinfer1::ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr)
        {
            mFinder = finder;
        }
    }

    ILogger* find() noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        try
        {
            return mFinder == nullptr ? nullptr : mFinder->findLogger();
        }
        catch (...)
        {
            return nullptr;
        }
    }

private:
    std::mutex mMutex;
    nvinfer1::ILoggerFinder* mFinder{nullptr};
};

LoggerFinderHolder gLoggerFinder;

void logMessage(ILogger::Severity severity, char const* message) noexcept
{
    if (ILogger* logger = gLoggerFinder.find())
    {
        logger->log(severity, message);
        return;
    }
    // No TensorRT logger (static registration, or a host that never called setLoggerFinder).
    try
    {
        std::cerr << "[" << kTERNARY_MATMUL_NAME << "] " << message << std::endl;
    }
    catch (...)
    {
    }
}

//! Logs the exception in flight as "<what> (in <where>)"; to be called only from a catch block.
void logCurrentException(char const* where) noexcept
{
    try
    {
        throw;
    }
    catch (std::exception const& e)
    {
        try
        {
            std::string const message = std::string{e.what()} + " (in " + where + ")";
            logMessage(ILogger::Severity::kERROR, message.c_str());
        }
        catch (...)
        {
            logMessage(ILogger::Severity::kERROR, e.what());
        }
    }
    catch (...)
    {
        logMessage(ILogger::Severity::kERROR, where);
    }
}

TensorType toTensorType(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return TensorType::kFLOAT;
    case nvinfer1::DataType::kHALF: return TensorType::kHALF;
    case nvinfer1::DataType::kBF16: return TensorType::kBF16;
    case nvinfer1::DataType::kINT32: return TensorType::kINT32;
    default: return TensorType::kOTHER;
    }
}

terdit::DataType toKernelType(TensorType type)
{
    switch (type)
    {
    case TensorType::kFLOAT: return terdit::DataType::kFLOAT;
    case TensorType::kHALF: return terdit::DataType::kHALF;
    case TensorType::kBF16: return terdit::DataType::kBF16;
    default: break;
    }
    throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": input X has type " + tensorTypeName(type)
        + "; supported activation types are float32, float16 and bfloat16");
}

Shape toShape(nvinfer1::Dims const& dims)
{
    if (dims.nbDims < 0 || dims.nbDims > nvinfer1::Dims::MAX_DIMS)
    {
        throw TernaryMatMulError(
            std::string{kTERNARY_MATMUL_NAME} + ": invalid rank " + std::to_string(dims.nbDims) + " from TensorRT");
    }
    return Shape(dims.d, dims.d + dims.nbDims);
}

Shape toShape(DimsExprs const& dims)
{
    if (dims.nbDims < 0 || dims.nbDims > nvinfer1::Dims::MAX_DIMS)
    {
        throw TernaryMatMulError(
            std::string{kTERNARY_MATMUL_NAME} + ": invalid rank " + std::to_string(dims.nbDims) + " from TensorRT");
    }
    Shape shape;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        nvinfer1::IDimensionExpr const* d = dims.d[i];
        shape.push_back(d != nullptr && d->isConstant() ? d->getConstantValue() : kDYNAMIC_DIM);
    }
    return shape;
}

void requireNonNull(void const* pointer, char const* what)
{
    if (pointer == nullptr)
    {
        throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": TensorRT passed a null " + what);
    }
}

PluginTensorDesc const& descOf(PluginTensorDesc const& desc)
{
    return desc;
}

PluginTensorDesc const& descOf(DynamicPluginTensorDesc const& desc)
{
    return desc.desc;
}

//! Checks the shapes and types of a resolved I/O set (configurePlugin, onShapeChange).
template <typename Desc>
void checkIO(TernaryMatMulAttrs const& attrs, Desc const* in, int32_t nbInputs, Desc const* out, int32_t nbOutputs)
{
    requireNonNull(in, "input description");
    requireNonNull(out, "output description");
    checkIOCounts(nbInputs, nbOutputs);
    auto getDesc = [&](int32_t i) -> PluginTensorDesc const& {
        return descOf(i < nbInputs ? in[i] : out[i - nbInputs]);
    };
    std::vector<Shape> shapes;
    TensorFormatDesc formats[5];
    for (int32_t i = 0; i < nbInputs + nbOutputs; ++i)
    {
        PluginTensorDesc const& desc = getDesc(i);
        formats[i] = {toTensorType(desc.type), desc.format == nvinfer1::TensorFormat::kLINEAR};
        if (i < nbInputs)
        {
            shapes.push_back(toShape(desc.dims));
        }
    }
    checkInputShapes(attrs, shapes);
    Shape const expected = outputShape(attrs, shapes[0]);
    Shape const actual = toShape(getDesc(nbInputs).dims);
    for (size_t axis = 0; axis < expected.size() && actual.size() == expected.size(); ++axis)
    {
        if (actual[axis] != expected[axis] && actual[axis] != kDYNAMIC_DIM && expected[axis] != kDYNAMIC_DIM)
        {
            throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": output Y dimension "
                + std::to_string(axis) + " is " + std::to_string(actual[axis]) + ", expected "
                + std::to_string(expected[axis]));
        }
    }
    if (actual.size() != expected.size())
    {
        throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": output Y has rank "
            + std::to_string(actual.size()) + ", expected " + std::to_string(expected.size()));
    }
    findFormat(formats, nbInputs, nbOutputs);
}

std::string describe(TernaryMatMulAttrs const& attrs)
{
    std::string description = "K=" + std::to_string(attrs.k) + " N=" + std::to_string(attrs.n);
    if (attrs.actQuant != ActQuantMode::kNONE)
    {
        description += std::string{" act_quant="} + actQuantName(attrs.actQuant);
    }
    return description;
}

//! act_quant="fp8" runs kernels that only a kernels library defining launchQuantizeRowsE4m3 has
//! (TERDIT_KERNELS_HAVE_FP8 is set by the build after looking for that symbol with nm).
void requireKernels(TernaryMatMulAttrs const& attrs)
{
    if (attrs.actQuant == ActQuantMode::kFP8E4M3 && !TERDIT_KERNELS_HAVE_FP8)
    {
        throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME}
            + ": act_quant='fp8' needs the W1.58A8 kernels (terdit::launchQuantizeRowsE4m3), which the kernels "
              "library linked into this plugin does not define; rebuild the plugin with kernels that have them, or "
              "export the model without act_quant (weight-only)");
    }
}

} // namespace

TernaryMatMulPlugin::TernaryMatMulPlugin(TernaryMatMulAttrs const& attrs)
    : mAttrs(attrs)
    , mDescription(describe(attrs))
{
    validateAttrs(mAttrs);
}

nvinfer1::IPluginCapability* TernaryMatMulPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* TernaryMatMulPlugin::clone() noexcept
{
    try
    {
        return new TernaryMatMulPlugin(*this);
    }
    catch (...)
    {
        logCurrentException("clone");
    }
    return nullptr;
}

int32_t TernaryMatMulPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        checkIO(mAttrs, in, nbInputs, out, nbOutputs);
        requireKernels(mAttrs);
        if (mAttrs.actQuant != ActQuantMode::kNONE)
        {
            // The workspace of the profile's largest X must be representable (getWorkspaceSize cannot fail).
            workspaceLayout(mAttrs, rowsOf(in[0].max.d, in[0].max.nbDims));
        }
        mNbInputs = nbInputs;
        return 0;
    }
    catch (...)
    {
        logCurrentException("configurePlugin");
    }
    return -1;
}

int32_t TernaryMatMulPlugin::getOutputDataTypes(
    nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        checkIOCounts(nbInputs, nbOutputs);
        requireNonNull(outputTypes, "output type array");
        requireNonNull(inputTypes, "input type array");
        outputType(toTensorType(inputTypes[0]));
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    catch (...)
    {
        logCurrentException("getOutputDataTypes");
    }
    return -1;
}

int32_t TernaryMatMulPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    try
    {
        checkIOCounts(nbInputs, nbOutputs);
        requireNonNull(inputs, "input shape array");
        requireNonNull(outputs, "output shape array");
        std::vector<Shape> shapes;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            shapes.push_back(toShape(inputs[i]));
        }
        checkInputShapes(mAttrs, shapes);
        // Y keeps X's leading dimension expressions, so a dynamic batch stays symbolic.
        DimsExprs const& x = inputs[0];
        DimsExprs& y = outputs[0];
        y.nbDims = x.nbDims;
        for (int32_t axis = 0; axis + 1 < x.nbDims; ++axis)
        {
            y.d[axis] = x.d[axis];
        }
        y.d[x.nbDims - 1] = exprBuilder.constant(mAttrs.n);
        requireNonNull(y.d[x.nbDims - 1], "expression for N");
        return 0;
    }
    catch (...)
    {
        logCurrentException("getOutputShapes");
    }
    return -1;
}

bool TernaryMatMulPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        requireNonNull(inOut, "tensor description array");
        checkIOCounts(nbInputs, nbOutputs);
        TensorFormatDesc formats[5]{};
        // Only inOut[0..pos] hold valid values at this point.
        for (int32_t i = 0; i <= pos && i < nbInputs + nbOutputs; ++i)
        {
            formats[i] = {toTensorType(inOut[i].desc.type), inOut[i].desc.format == nvinfer1::TensorFormat::kLINEAR};
        }
        return plugin::supportsFormatCombination(pos, formats, nbInputs, nbOutputs);
    }
    catch (...)
    {
        logCurrentException("supportsFormatCombination");
    }
    return false;
}

int32_t TernaryMatMulPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t TernaryMatMulPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    try
    {
        if (mAttrs.actQuant == ActQuantMode::kNONE)
        {
            return 0;
        }
        requireNonNull(inputs, "input description");
        if (nbInputs < 1)
        {
            throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": workspace query without inputs");
        }
        // Sized for the profile's largest X; every enqueue of the engine gets at least this much.
        return static_cast<size_t>(workspaceLayout(mAttrs, rowsOf(inputs[0].max.d, inputs[0].max.nbDims)).size);
    }
    catch (...)
    {
        logCurrentException("getWorkspaceSize");
    }
    return 0;
}

char const* TernaryMatMulPlugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* TernaryMatMulPlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t TernaryMatMulPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        checkIO(mAttrs, in, nbInputs, out, nbOutputs);
        requireKernels(mAttrs);
        rowsOf(in[0].dims.d, in[0].dims.nbDims);
        mNbInputs = nbInputs;
        return 0;
    }
    catch (...)
    {
        logCurrentException("onShapeChange");
    }
    return -1;
}

int32_t TernaryMatMulPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        requireKernels(mAttrs);
        if (mNbInputs != 3 && mNbInputs != 4)
        {
            throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME}
                + ": enqueue before configurePlugin/onShapeChange told the plugin its inputs");
        }
        requireNonNull(inputDesc, "input description");
        requireNonNull(outputDesc, "output description");
        requireNonNull(inputs, "input pointer array");
        requireNonNull(outputs, "output pointer array");
        TernaryMatmulParams params;
        params.x = inputs[0];
        params.w = static_cast<int32_t const*>(inputs[1]);
        params.scale = static_cast<float const*>(inputs[2]);
        params.bias = mNbInputs == 4 ? static_cast<float const*>(inputs[3]) : nullptr;
        params.y = outputs[0];
        params.m = rowsOf(inputDesc[0].dims.d, inputDesc[0].dims.nbDims);
        params.n = mAttrs.n;
        params.k = mAttrs.k;
        params.dtype = toKernelType(toTensorType(inputDesc[0].type));
        params.epilogue = Epilogue::kNONE;
        char const* stage = "";
        cudaError_t status = cudaSuccess;
        if (mAttrs.actQuant == ActQuantMode::kFP8E4M3 && params.m > 0)
        {
            status = enqueueFp8(params, workspace, stream, stage);
        }
        else
        {
            status = launchTernaryMatmul(params, stream);
        }
        if (status != cudaSuccess)
        {
            char const* reason = ternaryMatmulCheck(params);
            std::string const message = std::string{kTERNARY_MATMUL_NAME} + " enqueue (" + mDescription
                + ", M=" + std::to_string(params.m) + ")" + stage + ": " + cudaGetErrorName(status)
                + (reason != nullptr ? std::string{": "} + reason : std::string{});
            logMessage(ILogger::Severity::kERROR, message.c_str());
        }
        return static_cast<int32_t>(status);
    }
    catch (...)
    {
        logCurrentException("enqueue");
    }
    return static_cast<int32_t>(cudaErrorInvalidValue);
}

cudaError_t TernaryMatMulPlugin::enqueueFp8(
    TernaryMatmulParams& params, void* workspace, cudaStream_t stream, char const*& stage) const
{
    // X's rows are quantized into the workspace, then the product reads the e4m3 copy; params.dtype
    // keeps naming Y's type (X's type, by the format table).
    requireNonNull(workspace, "workspace (act_quant='fp8' needs getWorkspaceSize bytes)");
    WorkspaceLayout const layout = workspaceLayout(mAttrs, params.m);
    auto* const base = static_cast<uint8_t*>(workspace);
    auto* const xq = base + layout.xqOffset;
    auto* const xScale = reinterpret_cast<float*>(base + layout.xScaleOffset);
#if TERDIT_KERNELS_HAVE_FP8
    stage = " quantizing X to e4m3";
    cudaError_t const status = launchQuantizeRowsE4m3(params.x, params.dtype, params.m, params.k, xq, xScale, stream);
    if (status != cudaSuccess)
    {
        return status;
    }
    stage = " fp8 product";
    params.x = xq;
    params.xScale = xScale;
    params.actQuant = ActQuant::kFP8E4M3;
    return launchTernaryMatmul(params, stream);
#else
    // requireKernels refused this plugin before it got here.
    static_cast<void>(xq);
    static_cast<void>(xScale);
    static_cast<void>(stream);
    stage = " fp8 product";
    return cudaErrorNotSupported;
#endif
}

nvinfer1::IPluginV3* TernaryMatMulPlugin::attachToContext(nvinfer1::IPluginResourceContext* /* context */) noexcept
{
    return clone();
}

PluginFieldCollection const* TernaryMatMulPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFieldsToSerialize.clear();
        for (int32_t i = 0; i < kNB_FIELDS; ++i)
        {
            FieldSpec const& spec = kFIELD_SPECS[i];
            FieldData const data = fieldData(mAttrs, i);
            mFieldsToSerialize.emplace_back(spec.name, data.data, static_cast<PluginFieldType>(spec.type), data.length);
        }
        mFCToSerialize.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFCToSerialize.fields = mFieldsToSerialize.data();
        return &mFCToSerialize;
    }
    catch (...)
    {
        logCurrentException("getFieldsToSerialize");
    }
    return nullptr;
}

TernaryMatMulPluginCreator::TernaryMatMulPluginCreator()
{
    for (FieldSpec const& spec : kFIELD_SPECS)
    {
        mFieldNames.emplace_back(spec.name, nullptr, static_cast<PluginFieldType>(spec.type), spec.length);
    }
    mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFC.fields = mFieldNames.data();
}

PluginFieldCollection const* TernaryMatMulPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

nvinfer1::IPluginV3* TernaryMatMulPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept
{
    std::string where;
    try
    {
        where = std::string{"createPlugin for node '"} + (name != nullptr ? name : "") + "'";
        if (phase != nvinfer1::TensorRTPhase::kBUILD && phase != nvinfer1::TensorRTPhase::kRUNTIME)
        {
            throw TernaryMatMulError(
                std::string{kTERNARY_MATMUL_NAME} + ": unknown phase " + std::to_string(static_cast<int32_t>(phase)));
        }
        requireNonNull(fc, "field collection");
        std::vector<FieldView> views;
        for (int32_t i = 0; fc->fields != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            views.push_back({field.name, field.data, static_cast<FieldType>(field.type), field.length});
        }
        // A null array with a positive count reaches parseFields as such, and is rejected there.
        FieldView const* fields = fc->fields == nullptr ? nullptr : views.data();
        // Building, the collection comes from a model (another producer may add attributes, and the ONNX
        // parser passes only listed ones anyway): unknown fields are skipped with a warning. At run time it
        // is this plugin's own getFieldsToSerialize, so an unknown field means another plugin version.
        UnknownFields const unknown
            = phase == nvinfer1::TensorRTPhase::kBUILD ? UnknownFields::kIGNORE : UnknownFields::kREJECT;
        ParsedFields const parsed = parseFields(fields, fc->nbFields, unknown);
        for (std::string const& ignored : parsed.ignored)
        {
            std::string const message = std::string{kTERNARY_MATMUL_NAME} + ": " + where + ": ignoring unknown field '"
                + ignored + "' (version " + kTERNARY_MATMUL_VERSION + " reads K, N and act_quant)";
            logMessage(ILogger::Severity::kWARNING, message.c_str());
        }
        return new TernaryMatMulPlugin(parsed.attrs);
    }
    catch (...)
    {
        logCurrentException(where.empty() ? "createPlugin" : where.c_str());
    }
    return nullptr;
}

#if TERDIT_PLUGIN_STATIC_REGISTRATION
// For trtexec --staticPlugins: registers the creator while the library loads (needs libnvinfer's
// getPluginRegistry in the host process). Use getCreators (--dynamicPlugins) otherwise, not both.
REGISTER_TENSORRT_PLUGIN(TernaryMatMulPluginCreator);
#endif

} // namespace plugin
} // namespace terdit

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    terdit::plugin::gLoggerFinder.set(finder);
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    try
    {
        static terdit::plugin::TernaryMatMulPluginCreator sCreator;
        static nvinfer1::IPluginCreatorInterface* const kCREATORS[] = {&sCreator};
        nbCreators = 1;
        return kCREATORS;
    }
    catch (...)
    {
        terdit::plugin::logCurrentException("getCreators");
    }
    nbCreators = 0;
    return nullptr;
}
