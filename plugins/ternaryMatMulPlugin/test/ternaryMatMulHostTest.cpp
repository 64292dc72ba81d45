/*
 * Host test of the built plugin library, through the interface TensorRT uses: dlopen, the two
 * exported entry points, the creator and the plugin's host-side methods. It needs the TensorRT
 * headers but neither libnvinfer nor a GPU (every header-inline call it makes stays in the
 * headers), and it never lets the plugin reach a CUDA call.
 *
 *   ternaryMatMulHostTest libterdit_trt_plugin.so TernaryMatMul_PluginConfig.yaml
 */
#include "contractYaml.h"
#include "ternaryMatMulKernelFeatures.h"
#include "testHarness.h"

#include "NvInferRuntime.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using namespace nvinfer1;
using terdit::test::YamlNode;

namespace
{

constexpr int32_t kK{256};
constexpr int32_t kN{48};

// ---- Host-side IExprBuilder: constants fold, anything else is an opaque symbolic dimension. ----

class HostDimImpl : public apiv::VDimensionExpr
{
public:
    HostDimImpl(bool constant, int64_t value)
        : mConstant(constant)
        , mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    bool mConstant;
    int64_t mValue;
};

class HostDimExpr : public IDimensionExpr
{
public:
    HostDimExpr(bool constant, int64_t value)
        : mHostImpl(constant, value)
    {
        mImpl = &mHostImpl;
    }
    ~HostDimExpr() noexcept override = default;

private:
    HostDimImpl mHostImpl;
};

class HostExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(true, value);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        if (!a.isConstant() || !b.isConstant())
        {
            return symbolic();
        }
        int64_t const x = a.getConstantValue();
        int64_t const y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return make(true, x + y);
        case DimensionOperation::kPROD: return make(true, x * y);
        case DimensionOperation::kMAX: return make(true, x > y ? x : y);
        case DimensionOperation::kMIN: return make(true, x < y ? x : y);
        case DimensionOperation::kSUB: return make(true, x - y);
        case DimensionOperation::kEQUAL: return make(true, x == y);
        case DimensionOperation::kLESS: return make(true, x < y);
        case DimensionOperation::kFLOOR_DIV: return y == 0 ? nullptr : make(true, x / y);
        case DimensionOperation::kCEIL_DIV: return y == 0 ? nullptr : make(true, (x + y - 1) / y);
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    IDimensionExpr const* symbolic()
    {
        return make(false, 0);
    }

private:
    IDimensionExpr const* make(bool constant, int64_t value)
    {
        mExprs.push_back(std::make_unique<HostDimExpr>(constant, value));
        return mExprs.back().get();
    }
    std::deque<std::unique_ptr<HostDimExpr>> mExprs;
};

class HostExprBuilder : public IExprBuilder
{
public:
    HostExprBuilder()
    {
        mImpl = &mHostImpl;
    }
    ~HostExprBuilder() noexcept override = default;
    IDimensionExpr const* symbolic()
    {
        return mHostImpl.symbolic();
    }

private:
    HostExprBuilderImpl mHostImpl;
};

// ---- Logger handed to the library through setLoggerFinder. ----

class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        messages.emplace_back(severity, msg != nullptr ? msg : "");
    }
    int32_t errors() const
    {
        int32_t count = 0;
        for (auto const& m : messages)
        {
            count += m.first <= Severity::kERROR ? 1 : 0;
        }
        return count;
    }
    int32_t warnings() const
    {
        int32_t count = 0;
        for (auto const& m : messages)
        {
            count += m.first == Severity::kWARNING ? 1 : 0;
        }
        return count;
    }
    std::string last() const
    {
        return messages.empty() ? "" : messages.back().second;
    }
    std::vector<std::pair<Severity, std::string>> messages;
};

class RecordingLoggerFinder : public ILoggerFinder
{
public:
    explicit RecordingLoggerFinder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

RecordingLogger gLogger;
RecordingLoggerFinder gFinder(&gLogger);

//! Checks that `action` logged exactly one more error containing `needle`.
void expectLoggedError(std::function<bool()> const& action, std::string const& needle, char const* what, int32_t line)
{
    int32_t const before = gLogger.errors();
    bool const failedAsExpected = action();
    terdit::test::report(failedAsExpected, what, __FILE__, line, "call did not report failure");
    terdit::test::report(gLogger.errors() == before + 1 && gLogger.last().find(needle) != std::string::npos, what,
        __FILE__, line, "logged '" + gLogger.last() + "', expected one error containing '" + needle + "'");
}
#define EXPECT_LOGGED_ERROR(action, needle) expectLoggedError([&]() { return (action); }, needle, #action, __LINE__)

// ---- Helpers. ----

struct Fields
{
    int32_t k{kK};
    int32_t n{kN};
    std::string actQuant;
    std::vector<PluginField> fields{
        PluginField{"K", &k, PluginFieldType::kINT32, 1}, PluginField{"N", &n, PluginFieldType::kINT32, 1}};
    Fields() = default;
    //! Adds act_quant as the ONNX parser passes a STRING attribute: kCHAR, NUL-terminated, NUL counted.
    explicit Fields(std::string const& quant)
        : actQuant(quant)
    {
        fields.emplace_back("act_quant", actQuant.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(actQuant.size() + 1));
    }
    Fields(Fields const&) = delete;
    PluginFieldCollection collection() const
    {
        return PluginFieldCollection{static_cast<int32_t>(fields.size()), fields.data()};
    }
};

std::map<std::string, DataType> const kTYPES{
    {"float32", DataType::kFLOAT}, {"float16", DataType::kHALF}, {"bfloat16", DataType::kBF16},
    {"int32", DataType::kINT32}};

std::map<std::string, PluginFieldType> const kFIELD_TYPES{{"int32", PluginFieldType::kINT32},
    {"char", PluginFieldType::kCHAR}, {"float32", PluginFieldType::kFLOAT32}, {"int64", PluginFieldType::kINT64}};

//! Upper bound the profile gives a dynamic dimension in dynamicDesc.
constexpr int64_t kPROFILE_MAX{16};

//! A build-time description: dynamic dimensions (-1) range over 1 .. kPROFILE_MAX in the profile.
DynamicPluginTensorDesc dynamicDesc(std::vector<int64_t> const& dims, DataType type, TensorFormat format)
{
    DynamicPluginTensorDesc desc{};
    desc.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        desc.desc.dims.d[i] = dims[i];
    }
    desc.desc.type = type;
    desc.desc.format = format;
    desc.min = desc.opt = desc.max = desc.desc.dims;
    for (int32_t i = 0; i < desc.desc.dims.nbDims; ++i)
    {
        if (desc.desc.dims.d[i] < 0)
        {
            desc.min.d[i] = 1;
            desc.opt.d[i] = kPROFILE_MAX / 2;
            desc.max.d[i] = kPROFILE_MAX;
        }
    }
    return desc;
}

PluginTensorDesc tensorDesc(std::vector<int64_t> const& dims, DataType type)
{
    return dynamicDesc(dims, type, TensorFormat::kLINEAR).desc;
}

IPluginV3OneCore* core(IPluginV3* plugin)
{
    return static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* build(IPluginV3* plugin)
{
    return static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* plugin)
{
    return static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

//! A serialized field as (name, type, length, value); the value of a kINT32 field in decimal, of a
//! kCHAR field as its bytes.
using SerializedField = std::tuple<std::string, PluginFieldType, int32_t, std::string>;

std::vector<SerializedField> serialized(IPluginV3* plugin)
{
    std::vector<SerializedField> result;
    PluginFieldCollection const* fc = runtime(plugin)->getFieldsToSerialize();
    TEST_CHECK(fc != nullptr);
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        std::string value;
        TEST_CHECK(field.data != nullptr);
        if (field.data != nullptr && field.type == PluginFieldType::kINT32)
        {
            TEST_CHECK(field.length == 1);
            int32_t number = 0;
            std::memcpy(&number, field.data, sizeof(number));
            value = std::to_string(number);
        }
        else if (field.data != nullptr && field.type == PluginFieldType::kCHAR)
        {
            TEST_CHECK(field.length >= 1);
            value.assign(static_cast<char const*>(field.data), static_cast<size_t>(std::max(field.length, 0)));
        }
        else
        {
            TEST_CHECK_MSG(false, std::string{"unexpected serialized field type of "} + field.name);
        }
        result.emplace_back(field.name, field.type, field.length, value);
    }
    return result;
}

//! The serialized fields of a K=256, N=48 plugin with the given act_quant, as the ONNX parser would pass
//! them: act_quant NUL-terminated, NUL counted.
std::vector<SerializedField> expectedFields(std::string const& actQuant)
{
    return {SerializedField{"K", PluginFieldType::kINT32, 1, std::to_string(kK)},
        SerializedField{"N", PluginFieldType::kINT32, 1, std::to_string(kN)},
        SerializedField{"act_quant", PluginFieldType::kCHAR, static_cast<int32_t>(actQuant.size() + 1),
            actQuant + std::string(1, '\0')}};
}

// ---- Tests. ----

void testCreator(IPluginCreatorV3One* creator, YamlNode const& contract)
{
    YamlNode const& version = contract.at("versions").at(creator->getPluginVersion());
    TEST_CHECK(std::string{creator->getPluginName()} == contract.at("name").scalar);
    TEST_CHECK(std::string{creator->getPluginVersion()} == "1");
    TEST_CHECK(std::string{creator->getPluginNamespace()} == version.at("plugin_namespace").scalar);
    TEST_CHECK(std::string{creator->getPluginNamespace()}.empty());

    PluginFieldCollection const* names = creator->getFieldNames();
    std::vector<std::string> const expected = version.at("plugin_fields").list;
    TEST_CHECK(names != nullptr && names->nbFields == static_cast<int32_t>(expected.size()));
    for (int32_t i = 0; names != nullptr && i < names->nbFields && i < static_cast<int32_t>(expected.size()); ++i)
    {
        PluginField const& field = names->fields[i];
        TEST_CHECK_MSG(std::string{field.name} == expected[i], field.name);
        TEST_CHECK(field.type == kFIELD_TYPES.at(version.at("plugin_field_types").at(field.name).scalar));
        TEST_CHECK(std::to_string(field.length) == version.at("plugin_field_length").at(field.name).scalar);
        TEST_CHECK(field.data == nullptr);
    }
}

void testPluginInterfaces(IPluginV3* plugin)
{
    TEST_CHECK(std::string{plugin->getInterfaceInfo().kind} == "PLUGIN");
    TEST_CHECK(core(plugin) != nullptr && build(plugin) != nullptr && runtime(plugin) != nullptr);
    TEST_CHECK(std::string{core(plugin)->getInterfaceInfo().kind} == "PLUGIN_V3ONE_CORE");
    TEST_CHECK(std::string{build(plugin)->getInterfaceInfo().kind} == "PLUGIN_V3ONE_BUILD");
    TEST_CHECK(std::string{runtime(plugin)->getInterfaceInfo().kind} == "PLUGIN_V3ONE_RUNTIME");
    TEST_CHECK(build(plugin)->getInterfaceInfo().major == 1);
    TEST_CHECK(plugin->getCapabilityInterface(static_cast<PluginCapabilityType>(7)) == nullptr);
    TEST_CHECK(std::string{core(plugin)->getPluginName()} == "TernaryMatMul");
    TEST_CHECK(std::string{core(plugin)->getPluginVersion()} == "1");
    TEST_CHECK(std::string{core(plugin)->getPluginNamespace()}.empty());
    TEST_CHECK(build(plugin)->getNbOutputs() == 1);
    TEST_CHECK(build(plugin)->getWorkspaceSize(nullptr, 4, nullptr, 1) == 0);
    TEST_CHECK(std::string{build(plugin)->getTimingCacheID()} == "K=256 N=48");
    TEST_CHECK(std::string{build(plugin)->getMetadataString()} == "K=256 N=48");
}

void testOutputTypes(IPluginV3* plugin)
{
    IPluginV3OneBuild* b = build(plugin);
    for (DataType const x : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType const in[] = {x, DataType::kINT32, DataType::kFLOAT, DataType::kFLOAT};
        DataType out[1] = {DataType::kINT8};
        TEST_CHECK(b->getOutputDataTypes(out, 1, in, 4) == 0 && out[0] == x);
        TEST_CHECK(b->getOutputDataTypes(out, 1, in, 3) == 0 && out[0] == x);
    }
    DataType out[2]{};
    DataType const ints[] = {DataType::kINT32, DataType::kINT32, DataType::kFLOAT};
    EXPECT_LOGGED_ERROR(b->getOutputDataTypes(out, 1, ints, 3) != 0, "input X has type int32");
    DataType const fp[] = {DataType::kFLOAT, DataType::kINT32, DataType::kFLOAT};
    EXPECT_LOGGED_ERROR(b->getOutputDataTypes(out, 2, fp, 3) != 0, "got 2 outputs");
    EXPECT_LOGGED_ERROR(b->getOutputDataTypes(out, 1, fp, 2) != 0, "got 2 inputs");
    EXPECT_LOGGED_ERROR(b->getOutputDataTypes(nullptr, 1, fp, 3) != 0, "null output type array");
}

void testOutputShapes(IPluginV3* plugin)
{
    IPluginV3OneBuild* b = build(plugin);
    HostExprBuilder eb;
    IDimensionExpr const* batch = eb.symbolic();
    DimsExprs inputs[4]{};
    inputs[0].nbDims = 3;
    inputs[0].d[0] = batch;
    inputs[0].d[1] = eb.constant(256);
    inputs[0].d[2] = eb.constant(kK);
    inputs[1].nbDims = 2;
    inputs[1].d[0] = eb.constant(kN);
    inputs[1].d[1] = eb.constant(kK / 16);
    inputs[2].nbDims = 1;
    inputs[2].d[0] = eb.constant(kN);
    inputs[3] = inputs[2];
    for (int32_t const nbInputs : {3, 4})
    {
        DimsExprs outputs[1]{};
        TEST_CHECK(b->getOutputShapes(inputs, nbInputs, nullptr, 0, outputs, 1, eb) == 0);
        TEST_CHECK(outputs[0].nbDims == 3);
        TEST_CHECK(outputs[0].d[0] == batch);
        TEST_CHECK(outputs[0].d[1]->isConstant() && outputs[0].d[1]->getConstantValue() == 256);
        TEST_CHECK(outputs[0].d[2]->isConstant() && outputs[0].d[2]->getConstantValue() == kN);
    }
    DimsExprs outputs[1]{};
    inputs[0].d[2] = eb.constant(kK + 16);
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 4, nullptr, 0, outputs, 1, eb) != 0, "must be K = 256");
    inputs[0].d[2] = eb.symbolic();
    TEST_CHECK(b->getOutputShapes(inputs, 4, nullptr, 0, outputs, 1, eb) == 0);
    inputs[1].d[1] = eb.constant(kK);
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 4, nullptr, 0, outputs, 1, eb) != 0, "ceil(K / 16) = 16");
    inputs[1].d[1] = eb.constant(kK / 16);
    inputs[3].d[0] = eb.constant(kN + 1);
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 4, nullptr, 0, outputs, 1, eb) != 0, "input bias has shape [49]");
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 5, nullptr, 0, outputs, 1, eb) != 0, "got 5 inputs");
    EXPECT_LOGGED_ERROR(b->getOutputShapes(nullptr, 3, nullptr, 0, outputs, 1, eb) != 0, "null input shape array");
    inputs[0].nbDims = 0;
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 3, nullptr, 0, outputs, 1, eb) != 0, "input X has rank 0");
    inputs[0].nbDims = 99;
    EXPECT_LOGGED_ERROR(b->getOutputShapes(inputs, 3, nullptr, 0, outputs, 1, eb) != 0, "invalid rank 99");
}

//! Every (type, position) choice is accepted exactly when it extends a configuration of the contract.
void testFormats(IPluginV3* plugin, YamlNode const& version)
{
    IPluginV3OneBuild* b = build(plugin);
    YamlNode const& configs = version.at("configs");
    char const* const roles[] = {"X", "W", "scale", "bias", "Y"};
    std::set<std::vector<DataType>> valid[2];
    for (auto const& config : configs.map)
    {
        std::vector<DataType> row;
        for (char const* role : roles)
        {
            row.push_back(kTYPES.at(config.second.at(role).scalar));
        }
        valid[1].insert(row);
        valid[0].insert({row[0], row[1], row[2], row[4]});
    }
    TEST_CHECK(valid[1].size() == 3);
    std::vector<DataType> allTypes;
    for (int32_t t = 0; t < 12; ++t)
    {
        allTypes.push_back(static_cast<DataType>(t));
    }
    for (int32_t const nbInputs : {3, 4})
    {
        std::set<std::vector<DataType>> const& rows = valid[nbInputs - 3];
        int32_t const nbIO = nbInputs + 1;
        // Walk the tree of prefixes: a prefix is extended by every type, and accepted iff some row starts with it.
        std::vector<std::vector<DataType>> frontier{{}};
        int32_t accepted = 0;
        for (int32_t pos = 0; pos < nbIO; ++pos)
        {
            std::vector<std::vector<DataType>> next;
            for (auto const& prefix : frontier)
            {
                for (DataType const type : allTypes)
                {
                    std::vector<DataType> candidate = prefix;
                    candidate.push_back(type);
                    std::vector<DynamicPluginTensorDesc> io;
                    for (DataType const t : candidate)
                    {
                        io.push_back(dynamicDesc({1}, t, TensorFormat::kLINEAR));
                    }
                    io.resize(nbIO);
                    bool expected = false;
                    for (auto const& row : rows)
                    {
                        expected = expected || std::equal(candidate.begin(), candidate.end(), row.begin());
                    }
                    bool const got = b->supportsFormatCombination(pos, io.data(), nbInputs, 1);
                    TEST_CHECK_MSG(got == expected,
                        "pos " + std::to_string(pos) + " type " + std::to_string(static_cast<int32_t>(type)));
                    if (got)
                    {
                        next.push_back(candidate);
                        accepted += pos == nbIO - 1 ? 1 : 0;
                    }
                    io[pos].desc.format = TensorFormat::kCHW32;
                    TEST_CHECK(!b->supportsFormatCombination(pos, io.data(), nbInputs, 1));
                }
            }
            frontier = next;
        }
        TEST_CHECK(accepted == 3);
    }
    std::vector<DynamicPluginTensorDesc> io(5, dynamicDesc({1}, DataType::kFLOAT, TensorFormat::kLINEAR));
    EXPECT_LOGGED_ERROR(!b->supportsFormatCombination(5, io.data(), 4, 1), "format query for position 5 out of range");
    EXPECT_LOGGED_ERROR(!b->supportsFormatCombination(0, nullptr, 4, 1), "null tensor description array");
}

void testConfigureAndShapeChange(IPluginV3* plugin)
{
    IPluginV3OneBuild* b = build(plugin);
    IPluginV3OneRuntime* r = runtime(plugin);
    for (DataType const x : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DynamicPluginTensorDesc in[] = {dynamicDesc({-1, 256, kK}, x, TensorFormat::kLINEAR),
            dynamicDesc({kN, kK / 16}, DataType::kINT32, TensorFormat::kLINEAR),
            dynamicDesc({kN}, DataType::kFLOAT, TensorFormat::kLINEAR),
            dynamicDesc({kN}, DataType::kFLOAT, TensorFormat::kLINEAR)};
        DynamicPluginTensorDesc out[] = {dynamicDesc({-1, 256, kN}, x, TensorFormat::kLINEAR)};
        TEST_CHECK(b->configurePlugin(in, 4, out, 1) == 0);
        TEST_CHECK(b->configurePlugin(in, 3, out, 1) == 0);
        PluginTensorDesc const rin[] = {tensorDesc({2, 256, kK}, x), tensorDesc({kN, kK / 16}, DataType::kINT32),
            tensorDesc({kN}, DataType::kFLOAT), tensorDesc({kN}, DataType::kFLOAT)};
        PluginTensorDesc const rout[] = {tensorDesc({2, 256, kN}, x)};
        TEST_CHECK(r->onShapeChange(rin, 4, rout, 1) == 0);
        TEST_CHECK(r->onShapeChange(rin, 3, rout, 1) == 0);
    }
    DynamicPluginTensorDesc in[] = {dynamicDesc({-1, kK}, DataType::kHALF, TensorFormat::kLINEAR),
        dynamicDesc({kN, kK / 16}, DataType::kINT32, TensorFormat::kLINEAR),
        dynamicDesc({kN}, DataType::kFLOAT, TensorFormat::kLINEAR)};
    DynamicPluginTensorDesc out[] = {dynamicDesc({-1, kN}, DataType::kFLOAT, TensorFormat::kLINEAR)};
    EXPECT_LOGGED_ERROR(b->configurePlugin(in, 3, out, 1) != 0, "unsupported I/O configuration");
    out[0].desc.type = DataType::kHALF;
    TEST_CHECK(b->configurePlugin(in, 3, out, 1) == 0);
    in[1].desc.dims.d[0] = kN + 16;
    EXPECT_LOGGED_ERROR(b->configurePlugin(in, 3, out, 1) != 0, "must be N = 48");
    in[1].desc.dims.d[0] = kN;
    out[0].desc.dims.d[1] = kN + 16;
    EXPECT_LOGGED_ERROR(b->configurePlugin(in, 3, out, 1) != 0, "output Y dimension 1 is 64, expected 48");
    out[0].desc.dims.nbDims = 3;
    EXPECT_LOGGED_ERROR(b->configurePlugin(in, 3, out, 1) != 0, "output Y");
    EXPECT_LOGGED_ERROR(b->configurePlugin(nullptr, 3, out, 1) != 0, "null input description");

    PluginTensorDesc const rin[] = {tensorDesc({3, kK}, DataType::kBF16), tensorDesc({kN, kK / 16}, DataType::kINT32),
        tensorDesc({kN}, DataType::kFLOAT)};
    PluginTensorDesc rout[] = {tensorDesc({3, kN}, DataType::kBF16)};
    TEST_CHECK(r->onShapeChange(rin, 3, rout, 1) == 0);
    rout[0].dims.d[0] = 4;
    EXPECT_LOGGED_ERROR(r->onShapeChange(rin, 3, rout, 1) != 0, "output Y dimension 0 is 4, expected 3");
    rout[0].dims.d[0] = 3;
    rout[0].type = DataType::kFLOAT;
    EXPECT_LOGGED_ERROR(r->onShapeChange(rin, 3, rout, 1) != 0, "Y: float32");
}

//! enqueue paths that must fail before any CUDA call: the kernel is never reached here.
void testEnqueueRejections(IPluginCreatorV3One* creator)
{
    Fields f;
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> fresh(creator->createPlugin("enqueue", &fc, TensorRTPhase::kRUNTIME));
    TEST_CHECK(fresh != nullptr);
    if (fresh == nullptr)
    {
        return;
    }
    IPluginV3OneRuntime* r = runtime(fresh.get());
    PluginTensorDesc in[] = {tensorDesc({2, kK}, DataType::kINT8), tensorDesc({kN, kK / 16}, DataType::kINT32),
        tensorDesc({kN}, DataType::kFLOAT)};
    PluginTensorDesc out[] = {tensorDesc({2, kN}, DataType::kINT8)};
    void const* inputs[3]{};
    void* outputs[1]{};
    EXPECT_LOGGED_ERROR(r->enqueue(in, out, inputs, outputs, nullptr, nullptr) != 0, "enqueue before configurePlugin");
    EXPECT_LOGGED_ERROR(r->onShapeChange(in, 3, out, 1) != 0, "X: unsupported");
    in[0].type = DataType::kFLOAT;
    out[0].type = DataType::kFLOAT;
    TEST_CHECK(r->onShapeChange(in, 3, out, 1) == 0);
    in[0].type = DataType::kINT8;
    EXPECT_LOGGED_ERROR(r->enqueue(in, out, inputs, outputs, nullptr, nullptr) != 0, "input X has type unsupported");
    in[0].type = DataType::kFLOAT;
    in[0].dims.d[0] = -1;
    EXPECT_LOGGED_ERROR(r->enqueue(in, out, inputs, outputs, nullptr, nullptr) != 0, "unresolved dimension 0");
    EXPECT_LOGGED_ERROR(r->enqueue(nullptr, out, inputs, outputs, nullptr, nullptr) != 0, "null input description");
}

void testSerializeCloneRecreate(IPluginCreatorV3One* creator, IPluginV3* plugin)
{
    PluginFieldCollection const* names = creator->getFieldNames();
    auto const fields = serialized(plugin);
    TEST_CHECK(static_cast<int32_t>(fields.size()) == names->nbFields);
    for (size_t i = 0; i < fields.size() && static_cast<int32_t>(i) < names->nbFields; ++i)
    {
        TEST_CHECK(std::get<0>(fields[i]) == names->fields[i].name);
        TEST_CHECK(std::get<1>(fields[i]) == names->fields[i].type);
        // getFieldNames gives the length of a string field as 0 (any); the serialized one is its actual length.
        TEST_CHECK(names->fields[i].length == 0 || std::get<2>(fields[i]) == names->fields[i].length);
    }
    TEST_CHECK(fields == expectedFields("none"));

    // Re-create from the serialized collection, as TensorRT does when deserializing an engine.
    PluginFieldCollection const* fc = runtime(plugin)->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> recreated(creator->createPlugin("recreated", fc, TensorRTPhase::kRUNTIME));
    TEST_CHECK(recreated != nullptr);
    if (recreated != nullptr)
    {
        TEST_CHECK(serialized(recreated.get()) == fields);
    }

    // A clone must stay valid after its source is gone.
    std::unique_ptr<IPluginV3> source(plugin->clone());
    TEST_CHECK(source != nullptr);
    if (source == nullptr)
    {
        return;
    }
    runtime(source.get())->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> cloned(source->clone());
    std::unique_ptr<IPluginV3> attached(runtime(source.get())->attachToContext(nullptr));
    source.reset();
    TEST_CHECK(cloned != nullptr && attached != nullptr);
    if (cloned != nullptr && attached != nullptr)
    {
        TEST_CHECK(cloned.get() != plugin && attached.get() != cloned.get());
        TEST_CHECK(serialized(cloned.get()) == fields);
        TEST_CHECK(serialized(attached.get()) == fields);
        testPluginInterfaces(cloned.get());
    }
}

//! Every truncated or corrupted field collection is refused: nullptr, one logged error, no crash.
void testRejectedCollections(IPluginCreatorV3One* creator)
{
    auto rejected = [&](PluginFieldCollection const* fc, TensorRTPhase phase, std::string const& needle, int32_t line) {
        IPluginV3* plugin = nullptr;
        expectLoggedError(
            [&]() {
                plugin = creator->createPlugin("bad_node", fc, phase);
                return plugin == nullptr;
            },
            needle, "createPlugin rejects", line);
        delete plugin;
    };
    for (TensorRTPhase const phase : {TensorRTPhase::kBUILD, TensorRTPhase::kRUNTIME})
    {
        rejected(nullptr, phase, "null field collection", __LINE__);
        for (size_t keep = 0; keep < 2; ++keep)
        {
            Fields f;
            f.fields.resize(keep);
            PluginFieldCollection const fc = f.collection();
            rejected(&fc, phase, "is missing", __LINE__);
        }
        {
            Fields f;
            PluginFieldCollection const fc{2, nullptr};
            rejected(&fc, phase, "invalid field collection", __LINE__);
            PluginFieldCollection const negative{-1, f.fields.data()};
            rejected(&negative, phase, "invalid field collection", __LINE__);
        }
        for (size_t which = 0; which < 2; ++which)
        {
            std::string const name = which == 0 ? "K" : "N";
            for (int32_t bit = 0; bit < 8; ++bit)
            {
                std::string corrupted = name;
                corrupted[0] = static_cast<char>(corrupted[0] ^ (1 << bit));
                Fields f;
                f.fields[which].name = corrupted.c_str();
                PluginFieldCollection const fc = f.collection();
                // Building, the corrupted name is skipped as unknown and the field it was is then missing.
                rejected(&fc, phase, phase == TensorRTPhase::kBUILD ? "is missing" : "unknown field", __LINE__);
            }
            for (int32_t type = 0; type <= 13; ++type)
            {
                if (type == static_cast<int32_t>(PluginFieldType::kINT32))
                {
                    continue;
                }
                Fields f;
                f.fields[which].type = static_cast<PluginFieldType>(type);
                PluginFieldCollection const fc = f.collection();
                rejected(&fc, phase, "expected type int32 and length 1", __LINE__);
            }
            for (int32_t const length : {0, 2, -1})
            {
                Fields f;
                f.fields[which].length = length;
                PluginFieldCollection const fc = f.collection();
                rejected(&fc, phase, "expected type int32 and length 1", __LINE__);
            }
            {
                Fields f;
                f.fields[which].data = nullptr;
                PluginFieldCollection const fc = f.collection();
                rejected(&fc, phase, "has no data", __LINE__);
            }
            {
                Fields f;
                f.fields[which].name = nullptr;
                PluginFieldCollection const fc = f.collection();
                rejected(&fc, phase, "has no name", __LINE__);
            }
            for (int32_t const value : {0, -16, 17, 8, std::numeric_limits<int32_t>::min()})
            {
                Fields f;
                (which == 0 ? f.k : f.n) = value;
                PluginFieldCollection const fc = f.collection();
                rejected(&fc, phase, "must be a positive multiple of 16", __LINE__);
            }
        }
        {
            Fields f;
            f.fields.push_back(f.fields[0]);
            PluginFieldCollection const fc = f.collection();
            rejected(&fc, phase, "given twice", __LINE__);
        }
        for (char const* value : {"fp16", "FP8", "", "fp8 "})
        {
            Fields f{value};
            PluginFieldCollection const fc = f.collection();
            rejected(&fc, phase, "field act_quant='" + std::string{value} + "' is not one of 'none', 'fp8'", __LINE__);
        }
        {
            // a contract value the plugin does not run: refused at build (and in an engine) with the way out
            Fields f{"int8"};
            PluginFieldCollection const fc = f.collection();
            rejected(&fc, phase,
                "act_quant=\"int8\" runs on the CPU kernels (ONNX Runtime / PyTorch) only; export "
                "with --act-quant none or fp8 for TensorRT",
                __LINE__);
        }
        {
            Fields f{"fp8"};
            f.fields[2].type = PluginFieldType::kINT32;
            PluginFieldCollection const fc = f.collection();
            rejected(&fc, phase, "field 'act_quant' has type int32 and length 4; expected type char", __LINE__);
        }
    }
    {
        Fields f;
        char const version[] = "1";
        f.fields.push_back(PluginField{"plugin_version", version, PluginFieldType::kCHAR, 2});
        PluginFieldCollection const fc = f.collection();
        rejected(&fc, TensorRTPhase::kRUNTIME, "unknown field 'plugin_version'", __LINE__);
    }
    Fields f;
    PluginFieldCollection const fc = f.collection();
    rejected(&fc, static_cast<TensorRTPhase>(5), "unknown phase 5", __LINE__);
}

//! Building, createPlugin skips fields it does not list with one warning each and creates the plugin;
//! the known fields beside them are still checked. (It used to refuse any unknown field.)
void testUnknownFieldsWhileBuilding(IPluginCreatorV3One* creator)
{
    Fields f;
    char const version[] = "1";
    int64_t const future = 3;
    f.fields.push_back(PluginField{"plugin_version", version, PluginFieldType::kCHAR, 2});
    f.fields.insert(f.fields.begin(), PluginField{"future_option", &future, PluginFieldType::kINT64, 1});
    PluginFieldCollection const fc = f.collection();
    int32_t const errorsBefore = gLogger.errors();
    int32_t const warningsBefore = gLogger.warnings();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node_with_extras", &fc, TensorRTPhase::kBUILD));
    TEST_CHECK(plugin != nullptr);
    TEST_CHECK(gLogger.errors() == errorsBefore);
    TEST_CHECK(gLogger.warnings() == warningsBefore + 2);
    size_t const n = gLogger.messages.size();
    TEST_CHECK(n >= 2
        && gLogger.messages[n - 2].second.find("ignoring unknown field 'future_option'") != std::string::npos
        && gLogger.messages[n - 2].second.find("node_with_extras") != std::string::npos);
    TEST_CHECK(n >= 1 && gLogger.messages[n - 1].second.find("ignoring unknown field 'plugin_version'") != std::string::npos);
    if (plugin != nullptr)
    {
        // The extras are not serialized, so the engine's fields re-create the plugin at run time.
        TEST_CHECK(serialized(plugin.get()) == expectedFields("none"));
        std::unique_ptr<IPluginV3> recreated(
            creator->createPlugin("node_with_extras", runtime(plugin.get())->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
        TEST_CHECK(recreated != nullptr);
    }
    // The same collection at run time is refused.
    int32_t const before = gLogger.errors();
    std::unique_ptr<IPluginV3> refused(creator->createPlugin("node_with_extras", &fc, TensorRTPhase::kRUNTIME));
    TEST_CHECK(refused == nullptr && gLogger.errors() == before + 1);
    TEST_CHECK(gLogger.last().find("unknown field 'future_option'") != std::string::npos);
    // Known fields stay strict beside unknown ones.
    f.k = 40;
    EXPECT_LOGGED_ERROR(creator->createPlugin("node_with_extras", &fc, TensorRTPhase::kBUILD) == nullptr,
        "field K=40 must be a positive multiple of 16");
}

//! act_quant: both values create a plugin, serialize and re-create; the I/O rules do not change; fp8
//! asks for the workspace of the quantized X and its scales; fp8 is refused at configure / shape
//! change / enqueue when the linked kernels lack the W1.58A8 launchers.
void testActQuant(IPluginCreatorV3One* creator, YamlNode const& version)
{
    for (std::string const mode : {"none", "fp8"})
    {
        Fields f{mode};
        PluginFieldCollection const fc = f.collection();
        int32_t const errorsBefore = gLogger.errors();
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("quant", &fc, TensorRTPhase::kBUILD));
        TEST_CHECK_MSG(plugin != nullptr && gLogger.errors() == errorsBefore, mode);
        if (plugin == nullptr)
        {
            continue;
        }
        std::string const id = mode == "fp8" ? "K=256 N=48 act_quant=fp8" : "K=256 N=48";
        TEST_CHECK(std::string{build(plugin.get())->getTimingCacheID()} == id);
        TEST_CHECK(std::string{build(plugin.get())->getMetadataString()} == id);

        // Serialization round trip, as an engine is saved and loaded.
        TEST_CHECK(serialized(plugin.get()) == expectedFields(mode));
        std::unique_ptr<IPluginV3> recreated(
            creator->createPlugin("quant", runtime(plugin.get())->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
        TEST_CHECK(recreated != nullptr);
        if (recreated != nullptr)
        {
            TEST_CHECK(serialized(recreated.get()) == expectedFields(mode));
            TEST_CHECK(std::string{build(recreated.get())->getTimingCacheID()} == id);
        }
        std::unique_ptr<IPluginV3> cloned(plugin->clone());
        TEST_CHECK(cloned != nullptr && serialized(cloned.get()) == expectedFields(mode));

        // Same format table and output types as the weight-only plugin: the quantization is internal.
        testOutputTypes(plugin.get());
        testFormats(plugin.get(), version);

        // Workspace, for the profile's largest X: [16, 256, K] -> M = 4096 rows; [16, K] -> 16 rows.
        IPluginV3OneBuild* b = build(plugin.get());
        DynamicPluginTensorDesc in[] = {dynamicDesc({-1, 256, kK}, DataType::kBF16, TensorFormat::kLINEAR),
            dynamicDesc({kN, kK / 16}, DataType::kINT32, TensorFormat::kLINEAR),
            dynamicDesc({kN}, DataType::kFLOAT, TensorFormat::kLINEAR)};
        DynamicPluginTensorDesc out[] = {dynamicDesc({-1, 256, kN}, DataType::kBF16, TensorFormat::kLINEAR)};
        // fp8: 4096 * 256 = 1048576 bytes of e4m3 (a multiple of 256), then 4096 * 4 = 16384 bytes of scales.
        TEST_CHECK(b->getWorkspaceSize(in, 3, out, 1) == (mode == "fp8" ? 1048576u + 16384u : 0u));
        DynamicPluginTensorDesc small[] = {dynamicDesc({-1, kK}, DataType::kHALF, TensorFormat::kLINEAR)};
        // fp8, 16 rows: 4096 bytes of e4m3, 64 bytes of scales padded to 256.
        TEST_CHECK(b->getWorkspaceSize(small, 1, out, 1) == (mode == "fp8" ? 4096u + 256u : 0u));
        DynamicPluginTensorDesc one[] = {dynamicDesc({kK}, DataType::kFLOAT, TensorFormat::kLINEAR)};
        // fp8, one row: 256 bytes of e4m3, 4 bytes of scales padded to 256.
        TEST_CHECK(b->getWorkspaceSize(one, 1, out, 1) == (mode == "fp8" ? 512u : 0u));
        if (mode == "fp8")
        {
            EXPECT_LOGGED_ERROR(b->getWorkspaceSize(nullptr, 3, out, 1) == 0, "null input description");
        }

        bool const runnable = mode == "none" || TERDIT_KERNELS_HAVE_FP8;
        IPluginV3OneRuntime* r = runtime(plugin.get());
        PluginTensorDesc const rin[] = {tensorDesc({2, 256, kK}, DataType::kBF16),
            tensorDesc({kN, kK / 16}, DataType::kINT32), tensorDesc({kN}, DataType::kFLOAT)};
        PluginTensorDesc const rout[] = {tensorDesc({2, 256, kN}, DataType::kBF16)};
        if (runnable)
        {
            TEST_CHECK(b->configurePlugin(in, 3, out, 1) == 0);
            TEST_CHECK(r->onShapeChange(rin, 3, rout, 1) == 0);
        }
        else
        {
            char const* needle = "act_quant='fp8' needs the W1.58A8 kernels (terdit::launchQuantizeRowsE4m3)";
            EXPECT_LOGGED_ERROR(b->configurePlugin(in, 3, out, 1) != 0, needle);
            EXPECT_LOGGED_ERROR(r->onShapeChange(rin, 3, rout, 1) != 0, needle);
            void const* inputs[3]{};
            void* outputs[1]{};
            EXPECT_LOGGED_ERROR(r->enqueue(rin, rout, inputs, outputs, nullptr, nullptr) != 0, needle);
        }
        if (mode == "fp8" && runnable)
        {
            // Refused before any CUDA call: TensorRT handed no workspace.
            void const* inputs[3]{};
            void* outputs[1]{};
            EXPECT_LOGGED_ERROR(r->enqueue(rin, rout, inputs, outputs, nullptr, nullptr) != 0, "null workspace");
        }
    }
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::cerr << "usage: " << argv[0] << " libterdit_trt_plugin.so TernaryMatMul_PluginConfig.yaml\n";
        return 2;
    }
    YamlNode contract;
    try
    {
        contract = terdit::test::loadContractYaml(argv[2]);
    }
    catch (std::exception const& e)
    {
        std::cerr << e.what() << "\n";
        return 2;
    }

    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::cerr << "dlopen failed: " << dlerror() << "\n";
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    TEST_CHECK(getCreators != nullptr && setLoggerFinder != nullptr);
    // Internal symbols stay hidden (exports.map).
    TEST_CHECK(dlsym(library, "_ZN6terdit19launchTernaryMatmulERKNS_19TernaryMatmulParamsEP11CUstream_st") == nullptr);
    TEST_CHECK(dlsym(library, "cudaLaunchKernel") == nullptr);
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return terdit::test::summarize("ternaryMatMulHostTest");
    }
    setLoggerFinder(&gFinder);

    int32_t nbCreators = -1;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    TEST_CHECK(nbCreators == 1 && creators != nullptr && creators[0] != nullptr);
    if (nbCreators != 1 || creators == nullptr || creators[0] == nullptr)
    {
        return terdit::test::summarize("ternaryMatMulHostTest");
    }
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    TEST_CHECK(std::string{info.kind} == "PLUGIN CREATOR_V3ONE" && info.major == 1 && info.minor == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);

    try
    {
        YamlNode const& version = contract.at("versions").at("1");
        testCreator(creator, contract);

        Fields f;
        PluginFieldCollection const fc = f.collection();
        int32_t const errorsBefore = gLogger.errors();
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
        std::unique_ptr<IPluginV3> unnamed(creator->createPlugin(nullptr, &fc, TensorRTPhase::kBUILD));
        TEST_CHECK(plugin != nullptr && unnamed != nullptr);
        TEST_CHECK(gLogger.errors() == errorsBefore);
        if (plugin != nullptr)
        {
            testPluginInterfaces(plugin.get());
        }
        if (plugin != nullptr && core(plugin.get()) != nullptr && build(plugin.get()) != nullptr
            && runtime(plugin.get()) != nullptr)
        {
            testOutputTypes(plugin.get());
            testOutputShapes(plugin.get());
            testFormats(plugin.get(), version);
            testConfigureAndShapeChange(plugin.get());
            testSerializeCloneRecreate(creator, plugin.get());
        }
        testEnqueueRejections(creator);
        testRejectedCollections(creator);
        testUnknownFieldsWhileBuilding(creator);
        testActQuant(creator, version);
    }
    catch (std::exception const& e)
    {
        TEST_CHECK_MSG(false, e.what());
    }
    // The library stays loaded: TensorRT never unloads a plugin library while its creators are registered.
    return terdit::test::summarize("ternaryMatMulHostTest");
}
