/*
 * ONNX Runtime custom op terdit::TernaryMatMul for the CPU execution provider: a thin adapter
 * over the CPU kernels (terditCpu.h). Built against the C API header only and asks for API 17
 * (KernelContext_ParallelFor), so one build loads into any ONNX Runtime from 1.17 on; the kernel
 * runs on the session's own intra-op thread pool. A registered kernel takes precedence over the
 * model's local function of the same name.
 *
 *   so = onnxruntime.SessionOptions(); so.register_custom_ops_library("libterdit_cpu.so")
 *
 * Inputs X [..., K] (float, float16 or bfloat16; the kernels compute in fp32), W int32
 * [N, ceil(K/16)], scale float [N], optional bias float [N]; output Y [..., N] of X's type.
 * Attributes K, N and the optional act_quant ("none" | "int8" | "fp8"; absent: "none").
 */
#include "terditCpu.h"

#include <onnxruntime_c_api.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#define TERDIT_ORT_API extern "C" __attribute__((visibility("default")))

namespace
{

constexpr uint32_t kORT_API_VERSION = 17; // the oldest API whose entries this file calls
OrtApi const* gApi = nullptr;

OrtStatus* fail(OrtErrorCode code, char const* format, ...)
{
    char text[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(text, sizeof(text), format, args);
    va_end(args);
    return gApi->CreateStatus(code, text);
}

//! Releases a status whose failure changes nothing here (a count or shape query of a tensor ORT
//! handed us).
void drop(OrtStatus* s)
{
    if (s != nullptr)
    {
        gApi->ReleaseStatus(s);
    }
}

struct TernaryKernel
{
    int64_t k;
    int64_t n;
    int32_t actQuant;
    std::string node;
};

std::string nodeName(OrtKernelInfo const* info)
{
    size_t size = 0;
    if (OrtStatus* s = gApi->KernelInfo_GetNodeName(info, nullptr, &size))
    {
        gApi->ReleaseStatus(s);
        return "?";
    }
    std::string name(size, '\0');
    if (OrtStatus* s = gApi->KernelInfo_GetNodeName(info, &name[0], &size))
    {
        gApi->ReleaseStatus(s);
        return "?";
    }
    name.resize(size > 0 ? size - 1 : 0);
    return name;
}

//! The optional act_quant attribute ("none" when absent).
std::string actQuantOf(OrtKernelInfo const* info)
{
    size_t size = 0;
    if (OrtStatus* s = gApi->KernelInfoGetAttribute_string(info, "act_quant", nullptr, &size))
    {
        gApi->ReleaseStatus(s);
        return "none";
    }
    std::string value(size, '\0');
    if (OrtStatus* s = gApi->KernelInfoGetAttribute_string(info, "act_quant", &value[0], &size))
    {
        gApi->ReleaseStatus(s);
        return "none";
    }
    value.resize(size > 0 ? size - 1 : 0);
    return value;
}

//! A constant W is checked once: shape [N, ceil(K/16)], no code 3, padding codes of weight 0.
OrtStatus* checkConstantWeights(OrtKernelInfo const* info, TernaryKernel const& kern)
{
    int isConstant = 0;
    OrtValue const* value = nullptr;
    if (OrtStatus* s = gApi->KernelInfoGetConstantInput_tensor(info, 1, &isConstant, &value))
    {
        gApi->ReleaseStatus(s);
        return nullptr;
    }
    if (!isConstant || value == nullptr)
    {
        return nullptr;
    }
    OrtTensorTypeAndShapeInfo* shape = nullptr;
    if (OrtStatus* s = gApi->GetTensorTypeAndShape(value, &shape))
    {
        return s;
    }
    size_t dims = 0;
    int64_t d[2] = {0, 0};
    drop(gApi->GetDimensionsCount(shape, &dims));
    if (dims == 2)
    {
        drop(gApi->GetDimensions(shape, d, 2));
    }
    gApi->ReleaseTensorTypeAndShapeInfo(shape);
    int64_t const words = (kern.k + 15) / 16;
    if (dims != 2 || d[0] != kern.n || d[1] != words)
    {
        return fail(ORT_INVALID_GRAPH, "TernaryMatMul node '%s': W must be int32 [N=%lld, %lld] for K=%lld; "
            "re-export the model", kern.node.c_str(), static_cast<long long>(kern.n),
            static_cast<long long>(words), static_cast<long long>(kern.k));
    }
    void const* data = nullptr;
    if (OrtStatus* s = gApi->GetTensorData(value, &data))
    {
        return s;
    }
    auto const* w = static_cast<uint32_t const*>(data);
    int64_t const pad = words * 16 - kern.k;
    for (int64_t row = 0; row < kern.n; ++row)
    {
        for (int64_t j = 0; j < words; ++j)
        {
            uint32_t const word = w[row * words + j];
            // a code 3 has both bits set: (word & (word >> 1)) has bit 2i set
            uint32_t const three = word & (word >> 1) & 0x55555555U;
            bool badPad = false;
            if (j == words - 1 && pad > 0)
            {
                for (int64_t p = 16 - pad; p < 16; ++p)
                {
                    badPad = badPad || ((word >> (2 * p)) & 3U) != 1U;
                }
            }
            if (three != 0 || badPad)
            {
                return fail(ORT_INVALID_GRAPH, "TernaryMatMul node '%s': W row %lld word %lld holds %s; "
                    "packed weights use codes 0, 1, 2 (padding 1): re-export the model",
                    kern.node.c_str(), static_cast<long long>(row), static_cast<long long>(j),
                    three != 0 ? "code 3" : "a non-zero padding code");
            }
        }
    }
    return nullptr;
}

OrtStatusPtr ORT_API_CALL createKernel(OrtCustomOp const*, OrtApi const*, OrtKernelInfo const* info, void** out)
{
    auto* kern = new (std::nothrow) TernaryKernel{};
    if (kern == nullptr)
    {
        return fail(ORT_FAIL, "TernaryMatMul: out of memory");
    }
    kern->node = nodeName(info);
    OrtStatus* s = gApi->KernelInfoGetAttribute_int64(info, "K", &kern->k);
    if (s == nullptr)
    {
        s = gApi->KernelInfoGetAttribute_int64(info, "N", &kern->n);
    }
    if (s != nullptr)
    {
        gApi->ReleaseStatus(s);
        std::string const node = kern->node;
        delete kern;
        return fail(ORT_INVALID_GRAPH, "TernaryMatMul node '%s': attributes K and N are required; re-export "
            "the model", node.c_str());
    }
    std::string const mode = actQuantOf(info);
    kern->actQuant = mode == "none" ? 0 : mode == "int8" ? 1 : mode == "fp8" ? 2 : -1;
    if (kern->actQuant < 0 || kern->k <= 0 || kern->n <= 0)
    {
        std::string const node = kern->node;
        long long const k = kern->k;
        long long const n = kern->n;
        delete kern;
        if (k <= 0 || n <= 0)
        {
            return fail(ORT_INVALID_GRAPH, "TernaryMatMul node '%s': K=%lld, N=%lld must be positive",
                node.c_str(), k, n);
        }
        return fail(ORT_INVALID_GRAPH, "TernaryMatMul node '%s': act_quant=\"%s\" is not supported by the "
            "terdit CPU kernels (none, int8, fp8)", node.c_str(), mode.c_str());
    }
    if (OrtStatus* bad = checkConstantWeights(info, *kern))
    {
        delete kern;
        return bad;
    }
    *out = kern;
    return nullptr;
}

void ortParallelFor(void* ctx, TerditCpuTask fn, void* arg, size_t count)
{
    OrtStatus* s = gApi->KernelContext_ParallelFor(static_cast<OrtKernelContext const*>(ctx), fn, count, 0, arg);
    if (s != nullptr)
    {
        gApi->ReleaseStatus(s);
        for (size_t i = 0; i < count; ++i) // no pool: run inline
        {
            fn(arg, i);
        }
    }
}

template <typename To, typename From>
To bitCast(From from)
{
    static_assert(sizeof(To) == sizeof(From), "bitCast keeps the size");
    To to;
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

float halfToFloat(uint16_t h)
{
    uint32_t const sign = (h & 0x8000U) << 16;
    uint32_t const exponent = (h >> 10) & 0x1fU;
    uint32_t const mantissa = h & 0x3ffU;
    float magnitude;
    if (exponent == 0)
    {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    }
    else if (exponent == 31)
    {
        magnitude = mantissa != 0 ? NAN : INFINITY;
    }
    else
    {
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400U), static_cast<int>(exponent) - 25);
    }
    return bitCast<float>(bitCast<uint32_t>(magnitude) | sign);
}

uint16_t floatToHalf(float f)
{
    uint32_t const bits = bitCast<uint32_t>(f);
    uint16_t const sign = static_cast<uint16_t>((bits >> 16) & 0x8000U);
    float const a = std::fabs(f);
    if (std::isnan(f))
    {
        return static_cast<uint16_t>(sign | 0x7e00U);
    }
    if (a >= 65520.0F)
    {
        return static_cast<uint16_t>(sign | 0x7c00U);
    }
    if (a < 6.103515625e-05F) // subnormal half: quantum 2^-24
    {
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0F)));
    }
    int exponent = 0;
    std::frexp(a, &exponent); // a in [2^(e-1), 2^e)
    float const quantum = std::ldexp(1.0F, exponent - 11);
    float const r = std::nearbyint(a / quantum) * quantum; // may round up to the next binade
    std::frexp(r, &exponent);
    auto const e = static_cast<uint32_t>(exponent - 1 + 15);
    auto const m = static_cast<uint32_t>(std::ldexp(r, -(exponent - 11))) & 0x3ffU;
    return static_cast<uint16_t>(sign | (e << 10) | m);
}

float bf16ToFloat(uint16_t h)
{
    return bitCast<float>(static_cast<uint32_t>(h) << 16);
}

uint16_t floatToBf16(float f)
{
    uint32_t bits = bitCast<uint32_t>(f);
    if (std::isnan(f))
    {
        return static_cast<uint16_t>((bits >> 16) | 0x40U);
    }
    bits += 0x7fffU + ((bits >> 16) & 1U); // round to nearest even
    return static_cast<uint16_t>(bits >> 16);
}

OrtStatus* tensorShape(OrtValue const* v, ONNXTensorElementDataType* type, std::vector<int64_t>& dims)
{
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* s = gApi->GetTensorTypeAndShape(v, &info))
    {
        return s;
    }
    size_t count = 0;
    drop(gApi->GetDimensionsCount(info, &count));
    dims.assign(count, 0);
    drop(gApi->GetDimensions(info, dims.data(), count));
    drop(gApi->GetTensorElementType(info, type));
    gApi->ReleaseTensorTypeAndShapeInfo(info);
    return nullptr;
}

OrtStatusPtr ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx)
{
    auto const& kern = *static_cast<TernaryKernel*>(kernel);
    OrtValue const* in[4] = {nullptr, nullptr, nullptr, nullptr};
    size_t inputs = 0;
    drop(gApi->KernelContext_GetInputCount(ctx, &inputs));
    for (size_t i = 0; i < inputs && i < 4; ++i)
    {
        if (OrtStatus* s = gApi->KernelContext_GetInput(ctx, i, &in[i]))
        {
            return s;
        }
    }
    ONNXTensorElementDataType xType{};
    ONNXTensorElementDataType type{};
    std::vector<int64_t> xDims;
    std::vector<int64_t> dims;
    if (OrtStatus* s = tensorShape(in[0], &xType, xDims))
    {
        return s;
    }
    if (xDims.empty() || xDims.back() != kern.k)
    {
        return fail(ORT_INVALID_ARGUMENT, "TernaryMatMul node '%s': X must be [..., K=%lld]", kern.node.c_str(),
            static_cast<long long>(kern.k));
    }
    if (OrtStatus* s = tensorShape(in[1], &type, dims))
    {
        return s;
    }
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || dims.size() != 2 || dims[0] != kern.n
        || dims[1] != (kern.k + 15) / 16)
    {
        return fail(ORT_INVALID_ARGUMENT, "TernaryMatMul node '%s': W must be int32 [%lld, %lld]", kern.node.c_str(),
            static_cast<long long>(kern.n), static_cast<long long>((kern.k + 15) / 16));
    }
    for (size_t i = 2; i < 4; ++i)
    {
        if (in[i] == nullptr)
        {
            continue;
        }
        if (OrtStatus* s = tensorShape(in[i], &type, dims))
        {
            return s;
        }
        if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dims.size() != 1 || dims[0] != kern.n)
        {
            return fail(ORT_INVALID_ARGUMENT, "TernaryMatMul node '%s': %s must be float [N=%lld]",
                kern.node.c_str(), i == 2 ? "scale" : "bias", static_cast<long long>(kern.n));
        }
    }
    if (in[2] == nullptr)
    {
        return fail(ORT_INVALID_ARGUMENT, "TernaryMatMul node '%s': scale is required", kern.node.c_str());
    }
    int64_t m = 1;
    for (size_t i = 0; i + 1 < xDims.size(); ++i)
    {
        m *= xDims[i];
    }
    std::vector<int64_t> yDims = xDims;
    yDims.back() = kern.n;
    OrtValue* out = nullptr;
    if (OrtStatus* s = gApi->KernelContext_GetOutput(ctx, 0, yDims.data(), yDims.size(), &out))
    {
        return s;
    }
    void const* ptr[4] = {nullptr, nullptr, nullptr, nullptr};
    for (size_t i = 0; i < 4; ++i)
    {
        if (in[i] != nullptr)
        {
            if (OrtStatus* s = gApi->GetTensorData(in[i], &ptr[i]))
            {
                return s;
            }
        }
    }
    void* yPtr = nullptr;
    if (OrtStatus* s = gApi->GetTensorMutableData(out, &yPtr))
    {
        return s;
    }
    if (m == 0)
    {
        return nullptr;
    }
    bool const isFloat = xType == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    bool const isHalf = xType == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    if (!isFloat && !isHalf && xType != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
    {
        return fail(ORT_INVALID_ARGUMENT, "TernaryMatMul node '%s': X must be float, float16 or bfloat16",
            kern.node.c_str());
    }
    std::vector<float> x32;
    std::vector<float> y32;
    float const* x = static_cast<float const*>(ptr[0]);
    float* y = static_cast<float*>(yPtr);
    if (!isFloat)
    {
        try
        {
            x32.resize(static_cast<size_t>(m * kern.k));
            y32.resize(static_cast<size_t>(m * kern.n));
        }
        catch (std::bad_alloc const&)
        {
            return fail(ORT_FAIL, "TernaryMatMul node '%s': out of memory", kern.node.c_str());
        }
        auto const* src = static_cast<uint16_t const*>(ptr[0]);
        for (size_t i = 0; i < x32.size(); ++i)
        {
            x32[i] = isHalf ? halfToFloat(src[i]) : bf16ToFloat(src[i]);
        }
        x = x32.data();
        y = y32.data();
    }
    int const rc = terditCpuTernaryMatmul(x, static_cast<int32_t const*>(ptr[1]), static_cast<float const*>(ptr[2]),
        static_cast<float const*>(ptr[3]), y, m, kern.n, kern.k, kern.actQuant, 0, ortParallelFor, ctx);
    if (rc != kTERDIT_CPU_OK)
    {
        return fail(ORT_FAIL, "TernaryMatMul node '%s': %s", kern.node.c_str(), terditCpuStatusString(rc));
    }
    if (!isFloat)
    {
        auto* dst = static_cast<uint16_t*>(yPtr);
        for (size_t i = 0; i < y32.size(); ++i)
        {
            dst[i] = isHalf ? floatToHalf(y32[i]) : floatToBf16(y32[i]);
        }
    }
    return nullptr;
}

void ORT_API_CALL destroyKernel(void* kernel)
{
    delete static_cast<TernaryKernel*>(kernel);
}

char const* ORT_API_CALL opName(OrtCustomOp const*)
{
    return "TernaryMatMul";
}

char const* ORT_API_CALL opProvider(OrtCustomOp const*)
{
    return "CPUExecutionProvider";
}

ONNXTensorElementDataType ORT_API_CALL inputType(OrtCustomOp const*, size_t index)
{
    switch (index)
    {
    case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; // float, float16 or bfloat16: checked in compute
    case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
}

size_t ORT_API_CALL inputCount(OrtCustomOp const*)
{
    return 4;
}

ONNXTensorElementDataType ORT_API_CALL outputType(OrtCustomOp const*, size_t)
{
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; // X's type
}

size_t ORT_API_CALL outputCount(OrtCustomOp const*)
{
    return 1;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL inputCharacteristic(OrtCustomOp const*, size_t index)
{
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL outputCharacteristic(OrtCustomOp const*, size_t)
{
    return INPUT_OUTPUT_REQUIRED;
}

OrtMemType ORT_API_CALL inputMemoryType(OrtCustomOp const*, size_t)
{
    return OrtMemTypeDefault;
}

OrtCustomOp makeOp()
{
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op)); // ORT calls some entries unconditionally: none may be garbage
    op.version = kORT_API_VERSION;
    op.GetName = opName;
    op.GetExecutionProviderType = opProvider;
    op.GetInputType = inputType;
    op.GetInputTypeCount = inputCount;
    op.GetOutputType = outputType;
    op.GetOutputTypeCount = outputCount;
    op.GetInputCharacteristic = inputCharacteristic;
    op.GetOutputCharacteristic = outputCharacteristic;
    op.GetInputMemoryType = inputMemoryType;
    op.CreateKernelV2 = createKernel;
    op.KernelComputeV2 = compute;
    op.KernelDestroy = destroyKernel;
    return op;
}

OrtCustomOp gOp = makeOp();

} // namespace

TERDIT_ORT_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* base)
{
    gApi = base->GetApi(kORT_API_VERSION);
    if (gApi == nullptr)
    {
        OrtApi const* oldest = base->GetApi(1);
        return oldest != nullptr ? oldest->CreateStatus(ORT_FAIL,
                   "libterdit_cpu: this ONNX Runtime is older than 1.17 (C API 17); upgrade onnxruntime")
                                 : nullptr;
    }
    OrtCustomOpDomain* domain = nullptr; // owned by ONNX Runtime's options from here on
    if (OrtStatus* s = gApi->CreateCustomOpDomain("terdit", &domain))
    {
        return s;
    }
    if (OrtStatus* s = gApi->CustomOpDomain_Add(domain, &gOp))
    {
        return s;
    }
    return gApi->AddCustomOpDomain(options, domain);
}
