/*
 * TernaryMatMul plugin logic that needs neither TensorRT nor CUDA: field parsing and validation,
 * shape rules and the table of supported formats. The TensorRT adapter (ternaryMatMulPlugin.cpp)
 * converts TensorRT's structs into the plain views below and calls these functions; every check
 * throws TernaryMatMulError, which the adapter catches at the TensorRT boundary.
 *
 * The op contract these functions implement is written down in TernaryMatMul_PluginConfig.yaml.
 */
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace terdit
{
namespace plugin
{

constexpr char const* kTERNARY_MATMUL_NAME{"TernaryMatMul"};
constexpr char const* kTERNARY_MATMUL_VERSION{"1"};
constexpr char const* kTERNARY_MATMUL_NAMESPACE{""};

//! Ternary codes per int32 word of W ("k16" layout, docs/design.md section 3).
constexpr int32_t kCODES_PER_WORD{16};
//! K and N must be multiples of this for the kernels (plugins/kernels/ternaryMatmul.h).
constexpr int32_t kSIZE_MULTIPLE{16};
//! Same bound as nvinfer1::Dims::MAX_DIMS.
constexpr int32_t kMAX_DIMS{8};
//! A dimension that is unknown at build time (TensorRT writes -1 in DynamicPluginTensorDesc).
constexpr int64_t kDYNAMIC_DIM{-1};

//! The one exception type thrown by the checks of this plugin.
class TernaryMatMulError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

//! Element type of a plugin field. The values mirror nvinfer1::PluginFieldType one for one
//! (the adapter static_asserts this), so a field type read from TensorRT converts by value;
//! values outside the enum are representable and rejected like any other wrong type.
enum class FieldType : int32_t
{
    kFLOAT16 = 0,
    kFLOAT32 = 1,
    kFLOAT64 = 2,
    kINT8 = 3,
    kINT16 = 4,
    kINT32 = 5,
    kCHAR = 6,
    kDIMS = 7,
    kUNKNOWN = 8,
    kBF16 = 9,
    kINT64 = 10,
    kFP8 = 11,
    kINT4 = 12,
    kFP4 = 13,
};

//! Short name used in messages and in the contract ("int32", "char", ...; "type 42" when unknown).
std::string fieldTypeName(FieldType type);

//! FieldSpec::length of a string field: any length (the ONNX parser passes a STRING attribute as kCHAR
//! with its terminating NUL counted; getFieldsToSerialize does the same).
constexpr int32_t kSTRING_LENGTH{0};

//! One entry of getFieldNames() / getFieldsToSerialize().
struct FieldSpec
{
    char const* name;
    FieldType type;
    int32_t length; //!< element count of a valid field; kSTRING_LENGTH for a string
    bool required;  //!< optional fields take their default when absent
};

//! The creator's fields, in getFieldNames() order; getFieldsToSerialize() emits the same list.
constexpr FieldSpec kFIELD_SPECS[] = {
    {"K", FieldType::kINT32, 1, true},
    {"N", FieldType::kINT32, 1, true},
    {"act_quant", FieldType::kCHAR, kSTRING_LENGTH, false},
};
constexpr int32_t kNB_FIELDS{static_cast<int32_t>(sizeof(kFIELD_SPECS) / sizeof(kFIELD_SPECS[0]))};

//! A field as handed to createPlugin, with TensorRT's types stripped.
struct FieldView
{
    char const* name;
    void const* data;
    FieldType type;
    int32_t length;
};

//! Activation quantization of the product (ONNX attribute / plugin field `act_quant`).
enum class ActQuantMode : int32_t
{
    kNONE = 0,    //!< "none" (the default): X as given, the weight-only product
    kFP8E4M3 = 1, //!< "fp8": W1.58A8, X quantized per token to float8 e4m3 inside the plugin
};

//! act_quant="int8" (W1.58A8 with int8 activations) is a valid contract value that runs on the CPU
//! kernels only: the creator refuses it with a message that says so.
constexpr char const* kACT_QUANT_CPU_ONLY = "int8";

//! The attribute value of a mode: "none" or "fp8".
char const* actQuantName(ActQuantMode mode);

//! Creation state of the plugin: X [..., K] times W [N, ceil(K / 16)] gives Y [..., N].
struct TernaryMatMulAttrs
{
    int32_t k{0};
    int32_t n{0};
    ActQuantMode actQuant{ActQuantMode::kNONE};
};

//! What createPlugin does with a field whose name the creator does not list.
enum class UnknownFields : int32_t
{
    kIGNORE, //!< build phase: another producer's extra attribute; skipped and reported in ignored
    kREJECT, //!< runtime phase: the fields come from this plugin's own getFieldsToSerialize
};

struct ParsedFields
{
    TernaryMatMulAttrs attrs;
    std::vector<std::string> ignored; //!< names of the unknown fields skipped under UnknownFields::kIGNORE
};

//! Parses a field collection from the ONNX parser (build) or from getFieldsToSerialize (runtime).
//! Throws on a null collection, a missing required field, a duplicate known field, an unknown field
//! (kREJECT only), a wrong type or length, null data, or values that validateAttrs rejects. Known
//! fields are checked the same way in both modes.
ParsedFields parseFields(FieldView const* fields, int32_t nbFields, UnknownFields unknown);

//! K and N must be positive multiples of kSIZE_MULTIPLE; actQuant one of the modes.
void validateAttrs(TernaryMatMulAttrs const& attrs);

//! Data of field kFIELD_SPECS[index] as getFieldsToSerialize emits it: points into attrs (K, N) or
//! at a static NUL-terminated string (act_quant, length counting the NUL).
struct FieldData
{
    void const* data;
    int32_t length;
};
FieldData fieldData(TernaryMatMulAttrs const& attrs, int32_t index);

//! Alignment of each region of the enqueue workspace, in bytes.
constexpr int64_t kWORKSPACE_ALIGNMENT{256};

//! The enqueue workspace. kFP8E4M3: the e4m3 copy of X (M * K bytes) at xqOffset, then M float32
//! per-token scales at xScaleOffset, each region starting on a kWORKSPACE_ALIGNMENT boundary and
//! padded to one. kNONE: no workspace (size 0).
struct WorkspaceLayout
{
    int64_t xqOffset{0};
    int64_t xScaleOffset{0};
    int64_t size{0};
};

//! Layout for up to `rows` rows of X (getWorkspaceSize passes the profile's maximum M); throws on
//! negative rows or a size that overflows int64.
WorkspaceLayout workspaceLayout(TernaryMatMulAttrs const& attrs, int64_t rows);

//! Number of int32 words per row of W: ceil(K / 16).
int64_t packedWords(int32_t k) noexcept;

//! Inputs are X, W, scale and an optional bias; there is one output.
void checkIOCounts(int32_t nbInputs, int32_t nbOutputs);

//! Shape of one tensor; a dimension may be kDYNAMIC_DIM while building.
using Shape = std::vector<int64_t>;

//! Checks X [..., K], W [N, ceil(K / 16)], scale [N] and bias [N] against the attributes.
//! Dynamic dimensions pass; a known dimension must match exactly.
void checkInputShapes(TernaryMatMulAttrs const& attrs, std::vector<Shape> const& inputs);

//! Y = X's shape with the last dimension replaced by N (dynamic dimensions stay dynamic).
Shape outputShape(TernaryMatMulAttrs const& attrs, Shape const& x);

//! Rows of the matmul, M = product of X's leading dimensions; all dimensions must be known.
int64_t rowsOf(Shape const& x);
//! Same, on a raw dimension array (enqueue's hot path allocates nothing).
int64_t rowsOf(int64_t const* dims, int32_t nbDims);

//! Tensor element types the plugin tells apart; everything else is kOTHER.
enum class TensorType : int32_t
{
    kFLOAT,
    kHALF,
    kBF16,
    kINT32,
    kOTHER,
};

std::string tensorTypeName(TensorType type);

struct TensorFormatDesc
{
    TensorType type;
    bool linear; //!< TensorFormat::kLINEAR (row-major, contiguous)
};

//! One supported I/O configuration. All tensors use the linear format.
struct FormatRow
{
    char const* name;
    TensorType x;
    TensorType w;
    TensorType scale;
    TensorType bias;
    TensorType y;
};

//! The dispatch table of supported configurations: activations in fp32, fp16 or bf16, packed
//! weights in int32, scale and bias always fp32, output in the activation type.
constexpr FormatRow kSUPPORTED_FORMATS[] = {
    {"fp32", TensorType::kFLOAT, TensorType::kINT32, TensorType::kFLOAT, TensorType::kFLOAT, TensorType::kFLOAT},
    {"fp16", TensorType::kHALF, TensorType::kINT32, TensorType::kFLOAT, TensorType::kFLOAT, TensorType::kHALF},
    {"bf16", TensorType::kBF16, TensorType::kINT32, TensorType::kFLOAT, TensorType::kFLOAT, TensorType::kBF16},
};

//! IPluginV3OneBuild::supportsFormatCombination semantics: true when inOut[0..pos] is the prefix
//! of a row of kSUPPORTED_FORMATS (inOut[pos + 1..] is not read). inOut holds the inputs followed
//! by the output. Throws when the counts or pos are out of range.
bool supportsFormatCombination(int32_t pos, TensorFormatDesc const* inOut, int32_t nbInputs, int32_t nbOutputs);

//! Output type for the given X type; throws when X's type is not in the table.
TensorType outputType(TensorType x);

//! Checks a concrete I/O type combination (as seen by onShapeChange / enqueue) against the table
//! and returns its row.
FormatRow const& findFormat(TensorFormatDesc const* inOut, int32_t nbInputs, int32_t nbOutputs);

//! The contract as implemented by this code, as one JSON object (name, version, namespace,
//! fields, inputs, outputs, supported formats); compared against TernaryMatMul_PluginConfig.yaml.
std::string contractJson();

} // namespace plugin
} // namespace terdit
