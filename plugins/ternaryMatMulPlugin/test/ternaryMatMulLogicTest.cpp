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

    TernaryMatMulAttrs parse() const
    {
        return parseFields(fields.data(), static_cast<int32_t>(fields.size()));
    }
};

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
    TernaryMatMulAttrs const read = parseFields(unaligned, 2);
    TEST_CHECK(read.k == 4096 && read.n == 16384);

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
    TEST_THROWS(TernaryMatMulError, parseFields(nullptr, 2), "invalid field collection");
    TEST_THROWS(TernaryMatMulError, parseFields(set.fields.data(), -1), "invalid field collection");
    TEST_THROWS(TernaryMatMulError, parseFields(nullptr, 0), "required field 'K' is missing");
    TEST_THROWS(TernaryMatMulError, parseFields(set.fields.data(), 0), "required field 'K' is missing");
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
    for (char const* name : {"k", "n", "M", "", "K ", "KK", "plugin_version", "plugin_namespace"})
    {
        FieldSet set;
        set.fields[0].name = name;
        TEST_THROWS(TernaryMatMulError, set.parse(), std::string{"unknown field '"} + name + "'");
    }
    FieldSet set;
    set.fields[1].name = nullptr;
    TEST_THROWS(TernaryMatMulError, set.parse(), "field 1 has no name");

    FieldSet extra;
    int32_t const version = 1;
    extra.fields.push_back({"plugin_version", &version, FieldType::kINT32, 1});
    TEST_THROWS(TernaryMatMulError, extra.parse(), "unknown field 'plugin_version'");
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

    TernaryMatMulAttrs const attrs{32, 64};
    for (int32_t i = 0; i < kNB_FIELDS; ++i)
    {
        int32_t const expected = std::string{kFIELD_SPECS[i].name} == "K" ? 32 : 64;
        TEST_CHECK(*fieldValue(attrs, i) == expected);
    }
    TEST_THROWS(TernaryMatMulError, fieldValue(attrs, kNB_FIELDS), "out of range");
    TEST_THROWS(TernaryMatMulError, fieldValue(attrs, -1), "out of range");
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
    for (int32_t i = 0; i < kNB_FIELDS && i < static_cast<int32_t>(fields.size()); ++i)
    {
        FieldSpec const& spec = kFIELD_SPECS[i];
        TEST_CHECK_MSG(fields[i] == spec.name, fields[i]);
        TEST_CHECK(version.at("plugin_field_types").at(spec.name).scalar == fieldTypeName(spec.type));
        TEST_CHECK(version.at("plugin_field_length").at(spec.name).scalar == std::to_string(spec.length));
        TEST_CHECK(version.at("attribute_types").at(spec.name).scalar == "int");
        TEST_CHECK(version.at("attribute_options").at(spec.name).at("multiple_of").scalar
            == std::to_string(kSIZE_MULTIPLE));
        TEST_CHECK(version.at("attribute_options").at(spec.name).at("min").scalar == std::to_string(kSIZE_MULTIPLE));
    }

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
