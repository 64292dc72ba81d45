/*
 * Tests of the TensorRT-free plugin logic: field parsing, shape rules and the format table, and
 * the logic's field table against TernaryMatMul_PluginConfig.yaml.
 *
 *   ternaryMatMulLogicTest CONTRACT.yaml      run the checks
 *   ternaryMatMulLogicTest --contract-json    print the contract as implemented, as JSON
 */
#include "contractYaml.h"
#include "ternaryMatMulLogic.h"
#include "testHarness.h"

#include <algorithm>
#include <cstring>
#include <iostream>
#include <limits>
#include <set>
#include <string>
#include <vector>

using namespace terdit::plugin;
using terdit::test::YamlNode;

namespace
{

constexpr int32_t kK{256};
constexpr int32_t kN{48};

struct FieldSet
{
    int32_t k{kK};
    int32_t n{kN};
    std::vector<FieldView> fields;

    FieldSet()
    {
        fields.push_back({"K", &k, FieldType::kINT32, 1});
        fields.push_back({"N", &n, FieldType::kINT32, 1});
    }
    FieldSet(FieldSet const&) = delete;
    FieldSet& operator=(FieldSet const&) = delete;

    //! Parses as createPlugin does at run time (unknown fields refused).
    TernaryMatMulAttrs parse() const
    {
        return parseFields(fields.data(), static_cast<int32_t>(fields.size()), UnknownFields::kREJECT).attrs;
    }
    //! Parses as createPlugin does while building (unknown fields skipped and listed).
    ParsedFields parseBuild() const
    {
        return parseFields(fields.data(), static_cast<int32_t>(fields.size()), UnknownFields::kIGNORE);
    }
    void addActQuant(char const* value, int32_t length)
    {
        fields.push_back({"act_quant", value, FieldType::kCHAR, length});
    }
};

//! Length of a string field as the ONNX parser passes it: the characters and the terminating NUL.
int32_t onnxLength(char const* value)
{
    return static_cast<int32_t>(std::strlen(value) + 1);
}

void testValidFields()
{
    FieldSet set;
    TernaryMatMulAttrs const attrs = set.parse();
    TEST_CHECK(attrs.k == kK && attrs.n == kN);

    std::swap(set.fields[0], set.fields[1]);
    TernaryMatMulAttrs const swapped = set.parse();
    TEST_CHECK(swapped.k == kK && swapped.n == kN);

    // Unaligned field data must be read safely.
    unsigned char raw[2 * sizeof(int32_t) + 1];
    int32_t const k = 4096;
    int32_t const n = 16384;
    std::memcpy(raw + 1, &k, sizeof(k));
    std::memcpy(raw + 1 + sizeof(k), &n, sizeof(n));
    FieldView const unaligned[] = {
        {"K", raw + 1, FieldType::kINT32, 1},
        {"N", raw + 1 + sizeof(k), FieldType::kINT32, 1},
    };
    TernaryMatMulAttrs const read = parseFields(unaligned, 2, UnknownFields::kREJECT).attrs;
    TEST_CHECK(read.k == 4096 && read.n == 16384);
    TEST_CHECK(read.actQuant == ActQuantMode::kNONE);

    for (int32_t const value : {16, 32, 1024, 4096, 18432, 1 << 30})
    {
        FieldSet sized;
        sized.k = value;
        sized.n = value;
        TEST_CHECK(sized.parse().k == value);
    }
}

void testCollectionRejected()
{
    FieldSet set;
    for (UnknownFields const unknown : {UnknownFields::kREJECT, UnknownFields::kIGNORE})
    {
        TEST_THROWS(TernaryMatMulError, parseFields(nullptr, 2, unknown), "invalid field collection");
        TEST_THROWS(TernaryMatMulError, parseFields(set.fields.data(), -1, unknown), "invalid field collection");
        TEST_THROWS(TernaryMatMulError, parseFields(nullptr, 0, unknown), "required field 'K' is missing");
        TEST_THROWS(TernaryMatMulError, parseFields(set.fields.data(), 0, unknown), "required field 'K' is missing");
    }
}

void testMissingAndDuplicate()
{
    {
        FieldSet set;
        set.fields.erase(set.fields.begin());
        TEST_THROWS(TernaryMatMulError, set.parse(), "required field 'K' is missing");
    }
    {
        FieldSet set;
        set.fields.pop_back();
        TEST_THROWS(TernaryMatMulError, set.parse(), "required field 'N' is missing");
    }
    {
        FieldSet set;
        set.fields.push_back(set.fields[0]);
        TEST_THROWS(TernaryMatMulError, set.parse(), "field 'K' is given twice");
    }
    {
        FieldSet set;
        set.fields[1] = set.fields[0];
        TEST_THROWS(TernaryMatMulError, set.parse(), "field 'K' is given twice");
    }
}

void testNamesRejected()
{
    for (char const* name : {"k", "n", "M", "", "K ", "KK", "plugin_version", "plugin_namespace", "act_quant "})
    {
        FieldSet set;
        set.fields[0].name = name;
        TEST_THROWS(TernaryMatMulError, set.parse(), std::string{"unknown field '"} + name + "'");
        // Building, the unknown field is skipped, so the renamed K is now missing.
        TEST_THROWS(TernaryMatMulError, set.parseBuild(), "required field 'K' is missing");
    }
    FieldSet set;
    set.fields[1].name = nullptr;
    TEST_THROWS(TernaryMatMulError, set.parse(), "field 1 has no name");
    TEST_THROWS(TernaryMatMulError, set.parseBuild(), "field 1 has no name");

    FieldSet extra;
    int32_t const version = 1;
    extra.fields.push_back({"plugin_version", &version, FieldType::kINT32, 1});
    TEST_THROWS(TernaryMatMulError, extra.parse(), "unknown field 'plugin_version'");
}

//! While building, unknown fields (any name, type, length or data) are skipped and listed; the known
//! fields are checked exactly as at run time.
void testUnknownFieldsIgnoredWhileBuilding()
{
    FieldSet set;
    char const text[] = "1";
    int32_t const number = 7;
    set.fields.insert(set.fields.begin(), {"plugin_version", text, FieldType::kCHAR, 2});
    set.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    set.fields.push_back({"null_data", nullptr, static_cast<FieldType>(99), -5});
    set.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    ParsedFields const parsed = set.parseBuild();
    TEST_CHECK(parsed.attrs.k == kK && parsed.attrs.n == kN && parsed.attrs.actQuant == ActQuantMode::kNONE);
    TEST_CHECK((parsed.ignored
        == std::vector<std::string>{"plugin_version", "future_option", "null_data", "future_option"}));
    TEST_THROWS(TernaryMatMulError, set.parse(), "unknown field 'plugin_version'");

    FieldSet none;
    TEST_CHECK(none.parseBuild().ignored.empty());

    // Known fields stay strict beside unknown ones.
    FieldSet badType;
    badType.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    badType.fields[0].type = FieldType::kINT64;
    TEST_THROWS(TernaryMatMulError, badType.parseBuild(), "expected type int32 and length 1");
    FieldSet badValue;
    badValue.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    badValue.n = 17;
    TEST_THROWS(TernaryMatMulError, badValue.parseBuild(), "field N=17 must be a positive multiple of 16");
    FieldSet twice;
    twice.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    twice.fields.push_back(twice.fields[1]);
    TEST_THROWS(TernaryMatMulError, twice.parseBuild(), "field 'N' is given twice");
    FieldSet badQuant;
    badQuant.fields.push_back({"future_option", &number, FieldType::kINT32, 1});
    badQuant.addActQuant("fp16", onnxLength("fp16"));
    TEST_THROWS(TernaryMatMulError, badQuant.parseBuild(), "field act_quant='fp16' is not one of 'none', 'fp8'");
    FieldSet int8Quant;
    int8Quant.addActQuant("int8", onnxLength("int8"));
    TEST_THROWS(TernaryMatMulError, int8Quant.parseBuild(),
        "act_quant=\"int8\" runs on the CPU kernels (ONNX Runtime / PyTorch) only; export with "
        "--act-quant none or fp8 for TensorRT");
}

void testActQuant()
{
    TEST_CHECK(TernaryMatMulAttrs{}.actQuant == ActQuantMode::kNONE);
    TEST_CHECK(std::string{actQuantName(ActQuantMode::kNONE)} == "none");
    TEST_CHECK(std::string{actQuantName(ActQuantMode::kFP8E4M3)} == "fp8");
    TEST_THROWS(TernaryMatMulError, actQuantName(static_cast<ActQuantMode>(2)), "act_quant mode 2");
    struct Case
    {
        char const* bytes;
        int32_t length;
        ActQuantMode mode;
    };
    // As the ONNX parser passes them (NUL counted), without the NUL, and NUL-padded.
    char const fp8Padded[] = {'f', 'p', '8', '\0', '\0', '\0'};
    for (Case const c : {Case{"fp8", 4, ActQuantMode::kFP8E4M3}, Case{"fp8", 3, ActQuantMode::kFP8E4M3},
             Case{fp8Padded, 6, ActQuantMode::kFP8E4M3}, Case{"none", 5, ActQuantMode::kNONE},
             Case{"none", 4, ActQuantMode::kNONE}})
    {
        for (bool const build : {false, true})
        {
            FieldSet set;
            set.addActQuant(c.bytes, c.length);
            std::swap(set.fields[0], set.fields[2]);
            TernaryMatMulAttrs const attrs = build ? set.parseBuild().attrs : set.parse();
            TEST_CHECK_MSG(attrs.actQuant == c.mode && attrs.k == kK && attrs.n == kN, c.bytes);
        }
    }
    for (char const* bad : {"", "FP8", "fp8 ", " fp8", "fp16", "INT8", "int8 ", "e4m3", "None", "fp8e4m3"})
    {
        FieldSet set;
        set.addActQuant(bad, onnxLength(bad));
        TEST_THROWS(TernaryMatMulError, set.parse(), "field act_quant='" + std::string{bad} + "' is not one of 'none', 'fp8'");
        TEST_THROWS(TernaryMatMulError, set.parseBuild(), "export the node with act_quant=\"fp8\"");
    }
    {
        char const embedded[] = {'f', 'p', '8', '\0', 'x', '\0'};
        FieldSet set;
        set.addActQuant(embedded, 6);
        TEST_THROWS(TernaryMatMulError, set.parse(), "field 'act_quant' holds bytes after its terminating NUL");
    }
    {
        char const binary[] = {'f', '\x01', '8', '\0'};
        FieldSet set;
        set.addActQuant(binary, 4);
        TEST_THROWS(TernaryMatMulError, set.parse(), "field act_quant='f?8'");
    }
    for (int32_t const length : {0, -1, 65, std::numeric_limits<int32_t>::max()})
    {
        FieldSet set;
        set.addActQuant("fp8", length);
        TEST_THROWS(TernaryMatMulError, set.parse(),
            "field 'act_quant' has type char and length " + std::to_string(length) + "; expected type char and length 1 to 64");
    }
    {
        int32_t const one = 1;
        FieldSet set;
        set.fields.push_back({"act_quant", &one, FieldType::kINT32, 1});
        TEST_THROWS(TernaryMatMulError, set.parseBuild(), "has type int32 and length 1; expected type char");
    }
    {
        FieldSet set;
        set.addActQuant(nullptr, 4);
        TEST_THROWS(TernaryMatMulError, set.parse(), "field 'act_quant' has no data");
    }
    {
        FieldSet set;
        set.addActQuant("fp8", 4);
        set.addActQuant("none", 5);
        TEST_THROWS(TernaryMatMulError, set.parse(), "field 'act_quant' is given twice");
    }
    TernaryMatMulAttrs bad{kK, kN, static_cast<ActQuantMode>(7)};
    TEST_THROWS(TernaryMatMulError, validateAttrs(bad), "act_quant mode 7");
}

//! What getFieldsToSerialize emits parses back to the same attributes, for both modes.
void testFieldDataRoundTrip()
{
    for (ActQuantMode const mode : {ActQuantMode::kNONE, ActQuantMode::kFP8E4M3})
    {
        TernaryMatMulAttrs const attrs{4096, 18432, mode};
        std::vector<FieldView> views;
        for (int32_t i = 0; i < kNB_FIELDS; ++i)
        {
            FieldData const data = fieldData(attrs, i);
            views.push_back({kFIELD_SPECS[i].name, data.data, kFIELD_SPECS[i].type, data.length});
        }
        FieldData const quant = fieldData(attrs, 2);
        TEST_CHECK(std::string{kFIELD_SPECS[2].name} == "act_quant");
        TEST_CHECK(quant.length == static_cast<int32_t>(std::strlen(actQuantName(mode)) + 1));
        TEST_CHECK(static_cast<char const*>(quant.data)[quant.length - 1] == '\0');
        TernaryMatMulAttrs const back = parseFields(views.data(), kNB_FIELDS, UnknownFields::kREJECT).attrs;
        TEST_CHECK(back.k == attrs.k && back.n == attrs.n && back.actQuant == mode);
    }
    TernaryMatMulAttrs const attrs{32, 64};
    TEST_CHECK(*static_cast<int32_t const*>(fieldData(attrs, 0).data) == 32 && fieldData(attrs, 0).length == 1);
    TEST_CHECK(*static_cast<int32_t const*>(fieldData(attrs, 1).data) == 64 && fieldData(attrs, 1).length == 1);
    TEST_THROWS(TernaryMatMulError, fieldData(attrs, kNB_FIELDS), "out of range");
    TEST_THROWS(TernaryMatMulError, fieldData(attrs, -1), "out of range");
}

//! fp8: M * K bytes of e4m3 X, then M float32 scales, each region padded to 256 bytes; none: no workspace.
void testWorkspaceLayout()
{
    auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
    for (int64_t const m : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{7}, int64_t{33}, int64_t{64}, int64_t{1000},
             int64_t{8192}})
    {
        for (int32_t const k : {16, 48, 1024, 3072, 8192})
        {
            WorkspaceLayout const none = workspaceLayout(TernaryMatMulAttrs{k, 32, ActQuantMode::kNONE}, m);
            TEST_CHECK(none.size == 0);
            WorkspaceLayout const fp8 = workspaceLayout(TernaryMatMulAttrs{k, 32, ActQuantMode::kFP8E4M3}, m);
            TEST_CHECK(fp8.xqOffset == 0);
            TEST_CHECK(fp8.xScaleOffset == align(m * k));
            TEST_CHECK(fp8.xScaleOffset % kWORKSPACE_ALIGNMENT == 0 && fp8.size % kWORKSPACE_ALIGNMENT == 0);
            TEST_CHECK_MSG(fp8.size == align(m * k) + align(4 * m), "m " + std::to_string(m) + " k " + std::to_string(k));
            TEST_CHECK(fp8.size >= m * k + 4 * m);
        }
    }
    // Hand-checked: M = 2, K = 48: 96 bytes -> 256, 8 bytes of scales -> 256.
    WorkspaceLayout const small = workspaceLayout(TernaryMatMulAttrs{48, 16, ActQuantMode::kFP8E4M3}, 2);
    TEST_CHECK(small.xScaleOffset == 256 && small.size == 512);
    // M = 512, K = 3072: 1572864 bytes (already aligned) + 2048 bytes.
    WorkspaceLayout const big = workspaceLayout(TernaryMatMulAttrs{3072, 16, ActQuantMode::kFP8E4M3}, 512);
    TEST_CHECK(big.xScaleOffset == 1572864 && big.size == 1572864 + 2048);
    TEST_THROWS(TernaryMatMulError, workspaceLayout(TernaryMatMulAttrs{16, 16, ActQuantMode::kFP8E4M3}, -1),
        "workspace requested for -1 rows");
    TEST_THROWS(TernaryMatMulError,
        workspaceLayout(TernaryMatMulAttrs{1 << 30, 16, ActQuantMode::kFP8E4M3}, std::numeric_limits<int64_t>::max() / 4),
        "overflows int64");
    TEST_CHECK(workspaceLayout(TernaryMatMulAttrs{1 << 30, 16, ActQuantMode::kNONE}, int64_t{1} << 40).size == 0);
}

void testTypesAndLengthsRejected()
{
    for (int32_t type = -1; type <= 14; ++type)
    {
        if (type == static_cast<int32_t>(FieldType::kINT32))
        {
            continue;
        }
        for (size_t which = 0; which < 2; ++which)
        {
            FieldSet set;
            set.fields[which].type = static_cast<FieldType>(type);
            TEST_THROWS(TernaryMatMulError, set.parse(), "expected type int32 and length 1");
        }
    }
    TEST_CHECK(fieldTypeName(FieldType::kFLOAT32) == "float32");
    TEST_CHECK(fieldTypeName(static_cast<FieldType>(42)) == "type 42");
    for (int32_t const length : {0, 2, -1, std::numeric_limits<int32_t>::max()})
    {
        FieldSet set;
        set.fields[1].length = length;
        TEST_THROWS(TernaryMatMulError, set.parse(), "length " + std::to_string(length));
    }
    FieldSet set;
    set.fields[0].data = nullptr;
    TEST_THROWS(TernaryMatMulError, set.parse(), "field 'K' has no data");
}

void testValuesRejected()
{
    for (int32_t const bad :
        {0, -16, -1, 1, 8, 15, 17, 100, 1000, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()})
    {
        FieldSet k;
        k.k = bad;
        TEST_THROWS(TernaryMatMulError, k.parse(), "field K=" + std::to_string(bad) + " must be a positive multiple of 16");
        FieldSet n;
        n.n = bad;
        TEST_THROWS(TernaryMatMulError, n.parse(), "field N=" + std::to_string(bad) + " must be a positive multiple of 16");
    }
    TEST_THROWS(TernaryMatMulError, validateAttrs(TernaryMatMulAttrs{}), "field K=0");
}

//! Every truncation and every single-field corruption of a valid serialized set is rejected.
void testEveryTruncationAndCorruption()
{
    FieldSet reference;
    for (size_t keep = 0; keep < reference.fields.size(); ++keep)
    {
        FieldSet set;
        set.fields.resize(keep);
        TEST_THROWS(TernaryMatMulError, set.parse(), "is missing");
    }
    int32_t const corruptValues[] = {0, -kK, kK + 1, std::numeric_limits<int32_t>::min()};
    for (size_t which = 0; which < reference.fields.size(); ++which)
    {
        std::string const name = reference.fields[which].name;
        // Flip each bit of each character of the name.
        for (size_t byte = 0; byte < name.size(); ++byte)
        {
            for (int32_t bit = 0; bit < 8; ++bit)
            {
                std::string corrupted = name;
                corrupted[byte] = static_cast<char>(corrupted[byte] ^ (1 << bit));
                FieldSet set;
                set.fields[which].name = corrupted.c_str();
                TEST_THROWS(TernaryMatMulError, set.parse(), "field");
            }
        }
        for (int32_t const value : corruptValues)
        {
            FieldSet set;
            int32_t* target = which == 0 ? &set.k : &set.n;
            *target = value;
            TEST_THROWS(TernaryMatMulError, set.parse(), "must be a positive multiple of 16");
        }
    }
}

void testShapes()
{
    TernaryMatMulAttrs const attrs{kK, kN};
    Shape const x{2, 256, kK};
    Shape const w{kN, kK / 16};
    Shape const scale{kN};
    checkInputShapes(attrs, {x, w, scale});
    checkInputShapes(attrs, {x, w, scale, {kN}});
    checkInputShapes(attrs, {{kDYNAMIC_DIM, kDYNAMIC_DIM, kK}, w, scale});
    checkInputShapes(attrs, {{kDYNAMIC_DIM, kDYNAMIC_DIM, kDYNAMIC_DIM}, {kDYNAMIC_DIM, kDYNAMIC_DIM}, scale});
    checkInputShapes(attrs, {{kK}, w, scale});
    checkInputShapes(attrs, {{1, 1, 1, 1, 1, 1, 1, kK}, w, scale});
    TEST_CHECK(packedWords(16) == 1 && packedWords(17) == 2 && packedWords(kK) == kK / 16);

    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w}), "got 2 inputs");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w, scale, scale, scale}), "got 5 inputs");
    TEST_THROWS(TernaryMatMulError, checkIOCounts(3, 2), "got 2 outputs");
    TEST_THROWS(TernaryMatMulError, checkIOCounts(3, 0), "got 0 outputs");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {{2, 256, kK + 16}, w, scale}), "must be K = 256");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {{}, w, scale}), "input X has rank 0");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {{1, 1, 1, 1, 1, 1, 1, 1, kK}, w, scale}), "rank 9");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {{2, -2, kK}, w, scale}), "invalid dimension 1");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, {kN + 16, kK / 16}, scale}), "must be N = 48");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, {kN, kK / 16 + 1}, scale}), "ceil(K / 16) = 16");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, {kN, kK}, scale}), "ceil(K / 16) = 16");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, {kN * kK / 16}, scale}), "input W has rank 1");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w, {kN + 1}}), "input scale has shape [49]");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w, {1, kN}}), "input scale has rank 2");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w, scale, {kN - 16}}), "input bias has shape [32]");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(attrs, {x, w, scale, {}}), "input bias has rank 0");
    TEST_THROWS(TernaryMatMulError, checkInputShapes(TernaryMatMulAttrs{}, {x, w, scale}), "field K=0");

    TEST_CHECK((outputShape(attrs, x) == Shape{2, 256, kN}));
    TEST_CHECK((outputShape(attrs, {kDYNAMIC_DIM, 256, kDYNAMIC_DIM}) == Shape{kDYNAMIC_DIM, 256, kN}));
    TEST_CHECK((outputShape(attrs, {kK}) == Shape{kN}));
    TEST_THROWS(TernaryMatMulError, outputShape(attrs, {}), "rank 0");

    TEST_CHECK(rowsOf(x) == 512);
    TEST_CHECK(rowsOf({kK}) == 1);
    TEST_CHECK(rowsOf({0, 7, kK}) == 0);
    TEST_THROWS(TernaryMatMulError, rowsOf({kDYNAMIC_DIM, kK}), "unresolved dimension 0");
    TEST_THROWS(TernaryMatMulError, rowsOf(Shape{}), "input X has rank 0");
    TEST_THROWS(TernaryMatMulError, rowsOf(nullptr, 2), "no dimension array");
    TEST_THROWS(TernaryMatMulError, rowsOf(x.data(), 9), "input X has rank 9");
    int64_t const big = int64_t{1} << 40;
    TEST_THROWS(TernaryMatMulError, rowsOf({big, big, kK}), "overflows int64");
}

//! supportsFormatCombination agrees with the table for every type combination, position by position.
void testFormatTable()
{
    TensorType const types[] = {
        TensorType::kFLOAT, TensorType::kHALF, TensorType::kBF16, TensorType::kINT32, TensorType::kOTHER};
    for (int32_t const nbInputs : {3, 4})
    {
        int32_t const nbIO = nbInputs + 1;
        int32_t combos = 1;
        for (int32_t i = 0; i < nbIO; ++i)
        {
            combos *= 5;
        }
        int32_t accepted = 0;
        for (int32_t code = 0; code < combos; ++code)
        {
            std::vector<TensorFormatDesc> io;
            for (int32_t i = 0, c = code; i < nbIO; ++i, c /= 5)
            {
                io.push_back({types[c % 5], true});
            }
            bool allPositions = true;
            for (int32_t pos = 0; pos < nbIO; ++pos)
            {
                allPositions = allPositions && supportsFormatCombination(pos, io.data(), nbInputs, 1);
            }
            bool inTable = false;
            for (FormatRow const& row : kSUPPORTED_FORMATS)
            {
                bool const biasOk = nbInputs == 3 || io[3].type == row.bias;
                inTable = inTable
                    || (io[0].type == row.x && io[1].type == row.w && io[2].type == row.scale && biasOk
                        && io[nbIO - 1].type == row.y);
            }
            TEST_CHECK_MSG(allPositions == inTable, "combination " + std::to_string(code));
            accepted += inTable ? 1 : 0;
            if (inTable)
            {
                TEST_CHECK(findFormat(io.data(), nbInputs, 1).x == io[0].type);
            }
            else
            {
                TEST_THROWS(TernaryMatMulError, findFormat(io.data(), nbInputs, 1), "unsupported I/O configuration");
            }
        }
        TEST_CHECK(accepted == 3);
    }
    std::vector<TensorFormatDesc> io{{TensorType::kBF16, true}, {TensorType::kINT32, true},
        {TensorType::kFLOAT, true}, {TensorType::kFLOAT, true}, {TensorType::kBF16, true}};
    TEST_CHECK(supportsFormatCombination(4, io.data(), 4, 1));
    TEST_CHECK(findFormat(io.data(), 4, 1).name == std::string{"bf16"});
    io[4].type = TensorType::kHALF;
    TEST_CHECK(!supportsFormatCombination(4, io.data(), 4, 1));
    io[4].type = TensorType::kBF16;
    io[1].linear = false;
    TEST_CHECK(!supportsFormatCombination(1, io.data(), 4, 1));
    TEST_THROWS(TernaryMatMulError, findFormat(io.data(), 4, 1), "W: int32 non-linear");
    TEST_THROWS(TernaryMatMulError, supportsFormatCombination(5, io.data(), 4, 1), "format query for position 5 out of range");
    TEST_THROWS(TernaryMatMulError, supportsFormatCombination(-1, io.data(), 4, 1), "position -1 out of range");
    TEST_THROWS(TernaryMatMulError, supportsFormatCombination(0, nullptr, 4, 1), "out of range");
    TEST_THROWS(TernaryMatMulError, supportsFormatCombination(0, io.data(), 2, 1), "got 2 inputs");

    TEST_CHECK(outputType(TensorType::kFLOAT) == TensorType::kFLOAT);
    TEST_CHECK(outputType(TensorType::kHALF) == TensorType::kHALF);
    TEST_CHECK(outputType(TensorType::kBF16) == TensorType::kBF16);
    TEST_THROWS(TernaryMatMulError, outputType(TensorType::kINT32), "input X has type int32");
    TEST_THROWS(TernaryMatMulError, outputType(TensorType::kOTHER), "input X has type unsupported");
}

std::vector<std::string> listOf(YamlNode const& node)
{
    return node.list;
}

void testContract(char const* contractPath)
{
    YamlNode const root = terdit::test::loadContractYaml(contractPath);
    TEST_CHECK(root.at("name").scalar == kTERNARY_MATMUL_NAME);
    TEST_CHECK(root.at("interface").scalar == "IPluginV3");
    TEST_CHECK(root.at("onnx_domain").scalar == "terdit");
    TEST_CHECK((root.at("versions").keys() == std::vector<std::string>{kTERNARY_MATMUL_VERSION}));
    YamlNode const& version = root.at("versions").at(kTERNARY_MATMUL_VERSION);
    TEST_CHECK(version.at("plugin_namespace").scalar == kTERNARY_MATMUL_NAMESPACE);
    TEST_CHECK(version.at("attribute_values").at("plugin_version").scalar == kTERNARY_MATMUL_VERSION);
    TEST_CHECK(version.at("attribute_values").at("plugin_namespace").scalar == kTERNARY_MATMUL_NAMESPACE);
    TEST_CHECK((listOf(version.at("inputs")) == std::vector<std::string>{"X", "W", "scale", "bias"}));
    TEST_CHECK((listOf(version.at("optional_inputs")) == std::vector<std::string>{"bias"}));
    TEST_CHECK((listOf(version.at("outputs")) == std::vector<std::string>{"Y"}));

    std::vector<std::string> const fields = listOf(version.at("plugin_fields"));
    TEST_CHECK(static_cast<int32_t>(fields.size()) == kNB_FIELDS);
    std::vector<std::string> const attributes = listOf(version.at("attributes"));
    std::vector<std::string> const required = listOf(version.at("attributes_required"));
    auto contains = [](std::vector<std::string> const& list, std::string const& name) {
        return std::find(list.begin(), list.end(), name) != list.end();
    };
    for (int32_t i = 0; i < kNB_FIELDS && i < static_cast<int32_t>(fields.size()); ++i)
    {
        FieldSpec const& spec = kFIELD_SPECS[i];
        TEST_CHECK_MSG(fields[i] == spec.name, fields[i]);
        TEST_CHECK(version.at("plugin_field_types").at(spec.name).scalar == fieldTypeName(spec.type));
        TEST_CHECK(version.at("plugin_field_length").at(spec.name).scalar == std::to_string(spec.length));
        TEST_CHECK(contains(attributes, spec.name));
        TEST_CHECK_MSG(contains(required, spec.name) == spec.required, spec.name);
        if (spec.type == FieldType::kINT32)
        {
            TEST_CHECK(version.at("attribute_types").at(spec.name).scalar == "int");
            TEST_CHECK(version.at("attribute_options").at(spec.name).at("multiple_of").scalar
                == std::to_string(kSIZE_MULTIPLE));
            TEST_CHECK(
                version.at("attribute_options").at(spec.name).at("min").scalar == std::to_string(kSIZE_MULTIPLE));
        }
        else
        {
            TEST_CHECK(version.at("attribute_types").at(spec.name).scalar == "string");
        }
    }
    YamlNode const& actQuant = version.at("attribute_options").at("act_quant");
    TEST_CHECK((actQuant.at("values").list
        == std::vector<std::string>{
            actQuantName(ActQuantMode::kNONE), kACT_QUANT_CPU_ONLY, actQuantName(ActQuantMode::kFP8E4M3)}));
    TEST_CHECK((actQuant.at("plugin_refuses").list == std::vector<std::string>{kACT_QUANT_CPU_ONLY}));
    TEST_CHECK(actQuant.at("default").scalar == actQuantName(TernaryMatMulAttrs{}.actQuant));
    TEST_CHECK(version.at("workspace").at("alignment").scalar == std::to_string(kWORKSPACE_ALIGNMENT));

    YamlNode const& configs = version.at("configs");
    TEST_CHECK(configs.map.size() == sizeof(kSUPPORTED_FORMATS) / sizeof(kSUPPORTED_FORMATS[0]));
    std::set<std::string> xTypes;
    for (FormatRow const& row : kSUPPORTED_FORMATS)
    {
        YamlNode const& config = configs.at(row.name);
        TEST_CHECK(config.at("X").scalar == tensorTypeName(row.x));
        TEST_CHECK(config.at("W").scalar == tensorTypeName(row.w));
        TEST_CHECK(config.at("scale").scalar == tensorTypeName(row.scale));
        TEST_CHECK(config.at("bias").scalar == tensorTypeName(row.bias));
        TEST_CHECK(config.at("Y").scalar == tensorTypeName(row.y));
        xTypes.insert(tensorTypeName(row.x));
    }
    std::vector<std::string> const declared = listOf(version.at("input_types").at("X"));
    TEST_CHECK((std::set<std::string>(declared.begin(), declared.end()) == xTypes));
}

void testYamlReader()
{
    using terdit::test::parseContractYaml;
    YamlNode const node = parseContractYaml("---\na: 1\nb:\n  c: [x, \"y\", 'z']\n  d:\n    - p\n    - q\n...\n");
    TEST_CHECK(node.at("a").scalar == "1");
    TEST_CHECK((node.at("b").at("c").list == std::vector<std::string>{"x", "y", "z"}));
    TEST_CHECK((node.at("b").at("d").list == std::vector<std::string>{"p", "q"}));
    TEST_THROWS(std::runtime_error, parseContractYaml("a: 1\na: 2\n"), "duplicate key a");
    TEST_THROWS(std::runtime_error, parseContractYaml("a: {b: 1}\n"), "unsupported YAML construct");
    TEST_THROWS(std::runtime_error, parseContractYaml("a:\n  b: 1\n c: 2\n"), "unexpected indentation");
    TEST_THROWS(std::runtime_error, node.at("missing"), "missing key 'missing'");
}

} // namespace

int main(int argc, char** argv)
{
    if (argc == 2 && std::string{argv[1]} == "--contract-json")
    {
        std::cout << contractJson() << "\n";
        return 0;
    }
    if (argc != 2)
    {
        std::cerr << "usage: " << argv[0] << " CONTRACT.yaml | --contract-json\n";
        return 2;
    }
    testValidFields();
    testCollectionRejected();
    testMissingAndDuplicate();
    testNamesRejected();
    testUnknownFieldsIgnoredWhileBuilding();
    testActQuant();
    testFieldDataRoundTrip();
    testWorkspaceLayout();
    testTypesAndLengthsRejected();
    testValuesRejected();
    testEveryTruncationAndCorruption();
    testShapes();
    testFormatTable();
    testYamlReader();
    try
    {
        testContract(argv[1]);
    }
    catch (std::exception const& e)
    {
        TEST_CHECK_MSG(false, e.what());
    }
    return terdit::test::summarize("ternaryMatMulLogicTest");
}
