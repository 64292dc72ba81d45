#include "ternaryMatMulLogic.h"

#include <cstring>
#include <limits>
#include <sstream>

namespace terdit
{
namespace plugin
{
namespace
{

[[noreturn]] void fail(std::string const& message)
{
    throw TernaryMatMulError(std::string{kTERNARY_MATMUL_NAME} + ": " + message);
}

std::string shapeString(Shape const& shape)
{
    std::ostringstream os;
    os << "[";
    for (size_t i = 0; i < shape.size(); ++i)
    {
        os << (i ? ", " : "");
        if (shape[i] == kDYNAMIC_DIM)
        {
            os << "?";
        }
        else
        {
            os << shape[i];
        }
    }
    os << "]";
    return os.str();
}

void checkSizeValue(char const* name, int32_t value)
{
    if (value <= 0 || value % kSIZE_MULTIPLE != 0)
    {
        std::ostringstream os;
        os << "field " << name << "=" << value << " must be a positive multiple of " << kSIZE_MULTIPLE
           << " for the TernaryMatMul kernels; pad the layer to a multiple of " << kSIZE_MULTIPLE
           << " when exporting, or run this model with the onnxruntime or torch backend";
        fail(os.str());
    }
}

//! Checks one dimension: dynamic passes, a known value must equal `expected`.
void checkDim(char const* tensor, Shape const& shape, size_t axis, int64_t expected, char const* rule)
{
    int64_t const d = shape[axis];
    if (d != kDYNAMIC_DIM && d != expected)
    {
        std::ostringstream os;
        os << "input " << tensor << " has shape " << shapeString(shape) << " but dimension " << axis << " must be "
           << rule << " = " << expected << "; the node's K/N attributes do not match its tensors, re-export the model";
        fail(os.str());
    }
}

void checkRank(char const* tensor, Shape const& shape, size_t minRank, size_t maxRank)
{
    if (shape.size() < minRank || shape.size() > maxRank)
    {
        std::ostringstream os;
        os << "input " << tensor << " has rank " << shape.size() << " (shape " << shapeString(shape) << ") but must have ";
        if (minRank == maxRank)
        {
            os << "rank " << minRank;
        }
        else
        {
            os << "rank " << minRank << " to " << maxRank;
        }
        fail(os.str());
    }
    for (size_t axis = 0; axis < shape.size(); ++axis)
    {
        if (shape[axis] < 0 && shape[axis] != kDYNAMIC_DIM)
        {
            std::ostringstream os;
            os << "input " << tensor << " has shape " << shapeString(shape) << " with invalid dimension " << axis << " = "
               << shape[axis];
            fail(os.str());
        }
    }
}

char const* const kROLE_NAMES[] = {"X", "W", "scale", "bias", "Y"};

//! Row entry for a role index (0 X, 1 W, 2 scale, 3 bias, 4 Y).
TensorType rowType(FormatRow const& row, int32_t role)
{
    switch (role)
    {
    case 0: return row.x;
    case 1: return row.w;
    case 2: return row.scale;
    case 3: return row.bias;
    default: return row.y;
    }
}

//! Position in inOut -> role index; with three inputs the output follows scale.
int32_t roleOf(int32_t pos, int32_t nbInputs)
{
    return pos < nbInputs ? pos : 4;
}

//! Index of the field spec named `name`, or kNB_FIELDS.
int32_t findField(char const* name)
{
    int32_t spec = 0;
    while (spec < kNB_FIELDS && std::strcmp(kFIELD_SPECS[spec].name, name) != 0)
    {
        ++spec;
    }
    return spec;
}

//! Longest string field accepted: longer than any valid value, short enough that a corrupted length
//! is refused before any byte is read.
constexpr int32_t kMAX_STRING_LENGTH{64};

void checkFieldShape(FieldView const& field, FieldSpec const& expected)
{
    bool const isString = expected.length == kSTRING_LENGTH;
    bool const lengthOk = isString ? field.length >= 1 && field.length <= kMAX_STRING_LENGTH : field.length == expected.length;
    if (field.type != expected.type || !lengthOk)
    {
        std::string const rule = isString
            ? "expected type char and length 1 to " + std::to_string(kMAX_STRING_LENGTH) + " (an ONNX STRING attribute)"
            : "expected type " + fieldTypeName(expected.type) + " and length " + std::to_string(expected.length)
                + " (an ONNX INT attribute)";
        fail(std::string{"field '"} + field.name + "' has type " + fieldTypeName(field.type) + " and length "
            + std::to_string(field.length) + "; " + rule);
    }
    if (field.data == nullptr)
    {
        fail(std::string{"field '"} + field.name + "' has no data");
    }
}

//! A kCHAR field's text: its bytes up to the first NUL (the ONNX parser counts the terminating NUL
//! in the length; a producer that does not is accepted too). Bytes after the NUL are refused.
std::string readString(FieldView const& field)
{
    char const* bytes = static_cast<char const*>(field.data);
    std::string value(bytes, bytes + field.length);
    size_t const end = value.find('\0');
    if (end != std::string::npos)
    {
        if (value.find_first_not_of('\0', end) != std::string::npos)
        {
            fail(std::string{"field '"} + field.name + "' holds bytes after its terminating NUL");
        }
        value.resize(end);
    }
    return value;
}

//! The value as it can be printed in a message (non-printable bytes as '?').
std::string printable(std::string value)
{
    for (char& c : value)
    {
        c = (c >= 0x20 && c < 0x7f) ? c : '?';
    }
    return value;
}

ActQuantMode parseActQuant(std::string const& value)
{
    if (value == "none")
    {
        return ActQuantMode::kNONE;
    }
    if (value == "fp8")
    {
        return ActQuantMode::kFP8E4M3;
    }
    if (value == kACT_QUANT_CPU_ONLY)
    {
        // A valid contract value (terdit_common.op.ACT_QUANT) that only the CPU kernels implement.
        fail(std::string{"act_quant=\""} + kACT_QUANT_CPU_ONLY
            + "\" runs on the CPU kernels (ONNX Runtime / PyTorch) only; export with --act-quant none or fp8 "
              "for TensorRT");
    }
    fail("field act_quant='" + printable(value)
        + "' is not one of 'none', 'fp8'; export the node with act_quant=\"fp8\" for W1.58A8 (activations "
          "quantized per token to float8 e4m3), or without the attribute for the weight-only product");
}

//! rows * width * elementBytes rounded up to kWORKSPACE_ALIGNMENT; throws on int64 overflow.
int64_t alignedBytes(int64_t rows, int64_t width, int64_t elementBytes)
{
    int64_t const rowBytes = width * elementBytes;
    int64_t const limit = std::numeric_limits<int64_t>::max() - kWORKSPACE_ALIGNMENT;
    if (rowBytes <= 0 || rows > limit / rowBytes)
    {
        fail("workspace for M=" + std::to_string(rows) + " rows of " + std::to_string(rowBytes)
            + " bytes overflows int64");
    }
    int64_t const bytes = rows * rowBytes;
    return (bytes + kWORKSPACE_ALIGNMENT - 1) / kWORKSPACE_ALIGNMENT * kWORKSPACE_ALIGNMENT;
}

} // namespace

std::string fieldTypeName(FieldType type)
{
    switch (type)
    {
    case FieldType::kFLOAT16: return "float16";
    case FieldType::kFLOAT32: return "float32";
    case FieldType::kFLOAT64: return "float64";
    case FieldType::kINT8: return "int8";
    case FieldType::kINT16: return "int16";
    case FieldType::kINT32: return "int32";
    case FieldType::kCHAR: return "char";
    case FieldType::kDIMS: return "dims";
    case FieldType::kUNKNOWN: return "unknown";
    case FieldType::kBF16: return "bfloat16";
    case FieldType::kINT64: return "int64";
    case FieldType::kFP8: return "fp8";
    case FieldType::kINT4: return "int4";
    case FieldType::kFP4: return "fp4";
    }
    return "type " + std::to_string(static_cast<int32_t>(type));
}

char const* actQuantName(ActQuantMode mode)
{
    switch (mode)
    {
    case ActQuantMode::kNONE: return "none";
    case ActQuantMode::kFP8E4M3: return "fp8";
    }
    fail("act_quant mode " + std::to_string(static_cast<int32_t>(mode)) + " is not one of 0 (none), 1 (fp8)");
}

ParsedFields parseFields(FieldView const* fields, int32_t nbFields, UnknownFields unknown)
{
    if (nbFields < 0 || (fields == nullptr && nbFields > 0))
    {
        fail("invalid field collection (nbFields=" + std::to_string(nbFields)
            + (fields == nullptr ? ", fields=null)" : ")"));
    }
    ParsedFields result;
    TernaryMatMulAttrs& attrs = result.attrs;
    bool seen[kNB_FIELDS]{};
    for (int32_t i = 0; i < nbFields; ++i)
    {
        FieldView const& field = fields[i];
        if (field.name == nullptr)
        {
            fail("field " + std::to_string(i) + " has no name");
        }
        int32_t const spec = findField(field.name);
        if (spec == kNB_FIELDS)
        {
            if (unknown == UnknownFields::kIGNORE)
            {
                result.ignored.emplace_back(field.name);
                continue;
            }
            fail(std::string{"unknown field '"} + field.name + "'; version " + kTERNARY_MATMUL_VERSION
                + " takes the fields K, N and (optional) act_quant; an engine holding other fields was built by "
                  "another plugin version, rebuild it with this one");
        }
        FieldSpec const& expected = kFIELD_SPECS[spec];
        if (seen[spec])
        {
            fail(std::string{"field '"} + field.name + "' is given twice");
        }
        seen[spec] = true;
        checkFieldShape(field, expected);
        if (std::strcmp(expected.name, "act_quant") == 0)
        {
            attrs.actQuant = parseActQuant(readString(field));
        }
        else
        {
            // PluginField data carries no alignment promise, so copy instead of dereferencing.
            std::memcpy(std::strcmp(expected.name, "K") == 0 ? &attrs.k : &attrs.n, field.data, sizeof(int32_t));
        }
    }
    for (int32_t spec = 0; spec < kNB_FIELDS; ++spec)
    {
        if (kFIELD_SPECS[spec].required && !seen[spec])
        {
            fail(std::string{"required field '"} + kFIELD_SPECS[spec].name
                + "' is missing; the ONNX node needs integer attributes K and N");
        }
    }
    validateAttrs(attrs);
    return result;
}

void validateAttrs(TernaryMatMulAttrs const& attrs)
{
    checkSizeValue("K", attrs.k);
    checkSizeValue("N", attrs.n);
    actQuantName(attrs.actQuant);
}

FieldData fieldData(TernaryMatMulAttrs const& attrs, int32_t index)
{
    if (index < 0 || index >= kNB_FIELDS)
    {
        fail("field index " + std::to_string(index) + " out of range");
    }
    char const* name = kFIELD_SPECS[index].name;
    if (std::strcmp(name, "act_quant") == 0)
    {
        char const* value = actQuantName(attrs.actQuant);
        return {value, static_cast<int32_t>(std::strlen(value) + 1)};
    }
    return {std::strcmp(name, "K") == 0 ? &attrs.k : &attrs.n, 1};
}

WorkspaceLayout workspaceLayout(TernaryMatMulAttrs const& attrs, int64_t rows)
{
    if (rows < 0)
    {
        fail("workspace requested for " + std::to_string(rows) + " rows of X");
    }
    WorkspaceLayout layout;
    if (attrs.actQuant == ActQuantMode::kNONE)
    {
        return layout;
    }
    int64_t const xqBytes = alignedBytes(rows, attrs.k, 1);
    int64_t const scaleBytes = alignedBytes(rows, 1, static_cast<int64_t>(sizeof(float)));
    if (xqBytes > std::numeric_limits<int64_t>::max() - scaleBytes)
    {
        fail("workspace for M=" + std::to_string(rows) + ", K=" + std::to_string(attrs.k) + " overflows int64");
    }
    layout.xqOffset = 0;
    layout.xScaleOffset = xqBytes;
    layout.size = xqBytes + scaleBytes;
    return layout;
}

int64_t packedWords(int32_t k) noexcept
{
    return (static_cast<int64_t>(k) + kCODES_PER_WORD - 1) / kCODES_PER_WORD;
}

void checkIOCounts(int32_t nbInputs, int32_t nbOutputs)
{
    if (nbInputs != 3 && nbInputs != 4)
    {
        fail("got " + std::to_string(nbInputs)
            + " inputs; expected 3 (X, W, scale) or 4 (X, W, scale, bias); omit an absent bias instead of passing an "
              "empty input name");
    }
    if (nbOutputs != 1)
    {
        fail("got " + std::to_string(nbOutputs) + " outputs; expected 1 (Y)");
    }
}

void checkInputShapes(TernaryMatMulAttrs const& attrs, std::vector<Shape> const& inputs)
{
    checkIOCounts(static_cast<int32_t>(inputs.size()), 1);
    validateAttrs(attrs);
    Shape const& x = inputs[0];
    checkRank("X", x, 1, kMAX_DIMS);
    checkDim("X", x, x.size() - 1, attrs.k, "K");
    Shape const& w = inputs[1];
    checkRank("W", w, 2, 2);
    checkDim("W", w, 0, attrs.n, "N");
    checkDim("W", w, 1, packedWords(attrs.k), "ceil(K / 16)");
    Shape const& scale = inputs[2];
    checkRank("scale", scale, 1, 1);
    checkDim("scale", scale, 0, attrs.n, "N");
    if (inputs.size() == 4)
    {
        Shape const& bias = inputs[3];
        checkRank("bias", bias, 1, 1);
        checkDim("bias", bias, 0, attrs.n, "N");
    }
}

Shape outputShape(TernaryMatMulAttrs const& attrs, Shape const& x)
{
    checkRank("X", x, 1, kMAX_DIMS);
    Shape y{x};
    y.back() = attrs.n;
    return y;
}

int64_t rowsOf(int64_t const* dims, int32_t nbDims)
{
    if (nbDims < 1 || nbDims > kMAX_DIMS)
    {
        fail("input X has rank " + std::to_string(nbDims) + " but must have rank 1 to " + std::to_string(kMAX_DIMS));
    }
    if (dims == nullptr)
    {
        fail("input X has no dimension array");
    }
    int64_t m = 1;
    for (int32_t axis = 0; axis + 1 < nbDims; ++axis)
    {
        if (dims[axis] < 0)
        {
            fail("input X has shape " + shapeString(Shape(dims, dims + nbDims)) + " with an unresolved dimension "
                + std::to_string(axis) + " at run time");
        }
        if (dims[axis] != 0 && m > std::numeric_limits<int64_t>::max() / dims[axis])
        {
            fail("input X has shape " + shapeString(Shape(dims, dims + nbDims)) + " whose row count overflows int64");
        }
        m *= dims[axis];
    }
    return m;
}

int64_t rowsOf(Shape const& x)
{
    return rowsOf(x.data(), static_cast<int32_t>(x.size()));
}

std::string tensorTypeName(TensorType type)
{
    switch (type)
    {
    case TensorType::kFLOAT: return "float32";
    case TensorType::kHALF: return "float16";
    case TensorType::kBF16: return "bfloat16";
    case TensorType::kINT32: return "int32";
    case TensorType::kOTHER: break;
    }
    return "unsupported";
}

bool supportsFormatCombination(int32_t pos, TensorFormatDesc const* inOut, int32_t nbInputs, int32_t nbOutputs)
{
    checkIOCounts(nbInputs, nbOutputs);
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        fail("format query for position " + std::to_string(pos) + " out of range [0, "
            + std::to_string(nbInputs + nbOutputs) + ")");
    }
    for (FormatRow const& row : kSUPPORTED_FORMATS)
    {
        bool prefixMatches = true;
        for (int32_t i = 0; i <= pos && prefixMatches; ++i)
        {
            prefixMatches = inOut[i].linear && inOut[i].type == rowType(row, roleOf(i, nbInputs));
        }
        if (prefixMatches)
        {
            return true;
        }
    }
    return false;
}

TensorType outputType(TensorType x)
{
    for (FormatRow const& row : kSUPPORTED_FORMATS)
    {
        if (row.x == x)
        {
            return row.y;
        }
    }
    fail("input X has type " + tensorTypeName(x)
        + "; supported activation types are float32, float16 and bfloat16");
}

FormatRow const& findFormat(TensorFormatDesc const* inOut, int32_t nbInputs, int32_t nbOutputs)
{
    checkIOCounts(nbInputs, nbOutputs);
    for (FormatRow const& row : kSUPPORTED_FORMATS)
    {
        bool matches = inOut != nullptr;
        for (int32_t i = 0; i < nbInputs + nbOutputs && matches; ++i)
        {
            matches = inOut[i].linear && inOut[i].type == rowType(row, roleOf(i, nbInputs));
        }
        if (matches)
        {
            return row;
        }
    }
    std::ostringstream os;
    os << "unsupported I/O configuration (";
    for (int32_t i = 0; inOut != nullptr && i < nbInputs + nbOutputs; ++i)
    {
        os << (i ? ", " : "") << kROLE_NAMES[roleOf(i, nbInputs)] << ": " << tensorTypeName(inOut[i].type)
           << (inOut[i].linear ? "" : " non-linear");
    }
    os << "); supported: X and Y float32, float16 or bfloat16, W int32, scale and bias float32, all linear";
    fail(os.str());
}

std::string contractJson()
{
    std::ostringstream os;
    os << "{\"name\": \"" << kTERNARY_MATMUL_NAME << "\", \"version\": \"" << kTERNARY_MATMUL_VERSION
       << "\", \"namespace\": \"" << kTERNARY_MATMUL_NAMESPACE << "\", \"fields\": [";
    for (int32_t i = 0; i < kNB_FIELDS; ++i)
    {
        os << (i ? ", " : "") << "{\"name\": \"" << kFIELD_SPECS[i].name << "\", \"type\": \""
           << fieldTypeName(kFIELD_SPECS[i].type) << "\", \"length\": " << kFIELD_SPECS[i].length
           << ", \"required\": " << (kFIELD_SPECS[i].required ? "true" : "false") << "}";
    }
    os << "], \"act_quant_values\": [\"" << actQuantName(ActQuantMode::kNONE) << "\", \""
       << actQuantName(ActQuantMode::kFP8E4M3) << "\"], \"act_quant_refused\": [\"" << kACT_QUANT_CPU_ONLY
       << "\"], \"act_quant_default\": \""
       << actQuantName(TernaryMatMulAttrs{}.actQuant) << "\", \"workspace_alignment\": " << kWORKSPACE_ALIGNMENT;
    os << ", \"inputs\": [\"X\", \"W\", \"scale\", \"bias\"], \"optional_inputs\": [\"bias\"], "
          "\"outputs\": [\"Y\"], \"size_multiple\": "
       << kSIZE_MULTIPLE << ", \"codes_per_word\": " << kCODES_PER_WORD << ", \"formats\": {";
    bool first = true;
    for (FormatRow const& row : kSUPPORTED_FORMATS)
    {
        os << (first ? "" : ", ") << "\"" << row.name << "\": {";
        for (int32_t role = 0; role < 5; ++role)
        {
            os << (role ? ", " : "") << "\"" << kROLE_NAMES[role] << "\": \"" << tensorTypeName(rowType(row, role))
               << "\"";
        }
        os << "}";
        first = false;
    }
    os << "}}";
    return os.str();
}

} // namespace plugin
} // namespace terdit
