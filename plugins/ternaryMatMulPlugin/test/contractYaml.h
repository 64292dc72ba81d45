/*
 * A deliberately small reader for TernaryMatMul_PluginConfig.yaml, so the C++ tests can check the
 * plugin against the written contract without a YAML library. It accepts block mappings, block
 * lists of scalars, flow lists of plain scalars ("[a, b]"), plain and quoted scalars, comments and
 * the "---" / "..." document markers, and throws std::runtime_error on anything else. The Python
 * test (tests/test_plugin_host.py) reads the same file with PyYAML and cross-checks the result.
 */
#pragma once

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace terdit
{
namespace test
{

struct YamlNode
{
    enum class Kind
    {
        kSCALAR,
        kLIST,
        kMAP,
    };
    Kind kind{Kind::kSCALAR};
    std::string scalar;
    std::vector<std::string> list;
    std::vector<std::pair<std::string, YamlNode>> map;

    //! Child of a mapping; throws when absent or when this is not a mapping.
    YamlNode const& at(std::string const& key) const
    {
        if (kind != Kind::kMAP)
        {
            throw std::runtime_error("contract: '" + key + "' looked up in a non-mapping");
        }
        for (auto const& entry : map)
        {
            if (entry.first == key)
            {
                return entry.second;
            }
        }
        throw std::runtime_error("contract: missing key '" + key + "'");
    }

    std::vector<std::string> keys() const
    {
        std::vector<std::string> result;
        for (auto const& entry : map)
        {
            result.push_back(entry.first);
        }
        return result;
    }
};

namespace detail
{

struct Line
{
    int32_t number;
    size_t indent;
    std::string text;
};

inline std::string trim(std::string const& s)
{
    size_t const begin = s.find_first_not_of(" \t");
    if (begin == std::string::npos)
    {
        return "";
    }
    size_t const end = s.find_last_not_of(" \t\r");
    return s.substr(begin, end - begin + 1);
}

//! Index of the first character outside quotes for which `at(s, i)` holds, or npos.
template <typename Predicate>
inline size_t findUnquoted(std::string const& s, Predicate at)
{
    char quote = 0;
    for (size_t i = 0; i < s.size(); ++i)
    {
        char const c = s[i];
        if (quote != 0)
        {
            quote = c == quote ? 0 : quote;
        }
        else if (c == '"' || c == '\'')
        {
            quote = c;
        }
        else if (at(s, i))
        {
            return i;
        }
    }
    return std::string::npos;
}

//! Removes a comment: '#' at the start or after a blank, outside quotes.
inline std::string stripComment(std::string const& s)
{
    size_t const i = findUnquoted(s, [](std::string const& t, size_t k)
        { return t[k] == '#' && (k == 0 || t[k - 1] == ' ' || t[k - 1] == '\t'); });
    return i == std::string::npos ? s : s.substr(0, i);
}

inline std::string unquote(std::string const& raw, int32_t line)
{
    std::string const s = trim(raw);
    if (s.size() >= 2 && (s.front() == '"' || s.front() == '\''))
    {
        if (s.back() != s.front() || s.find('\\') != std::string::npos)
        {
            throw std::runtime_error("contract line " + std::to_string(line) + ": unsupported quoted scalar " + s);
        }
        return s.substr(1, s.size() - 2);
    }
    if (!s.empty() && (s.front() == '{' || s.front() == '&' || s.front() == '*' || s.front() == '|'
            || s.front() == '>'))
    {
        throw std::runtime_error("contract line " + std::to_string(line) + ": unsupported YAML construct " + s);
    }
    return s;
}

inline std::vector<std::string> flowList(std::string const& s, int32_t line)
{
    if (s.back() != ']')
    {
        throw std::runtime_error("contract line " + std::to_string(line) + ": unterminated flow list " + s);
    }
    std::vector<std::string> items;
    std::string const body = trim(s.substr(1, s.size() - 2));
    if (body.empty())
    {
        return items;
    }
    std::stringstream ss(body);
    std::string item;
    while (std::getline(ss, item, ','))
    {
        items.push_back(unquote(item, line));
    }
    return items;
}

//! Index of the ':' that ends a mapping key, or npos.
inline size_t keyColon(std::string const& s)
{
    return findUnquoted(s, [](std::string const& t, size_t k)
        { return t[k] == ':' && (k + 1 == t.size() || t[k + 1] == ' '); });
}

inline YamlNode parseBlock(std::vector<Line> const& lines, size_t& pos, size_t indent)
{
    YamlNode node;
    bool const isList = lines[pos].text.rfind("- ", 0) == 0 || lines[pos].text == "-";
    node.kind = isList ? YamlNode::Kind::kLIST : YamlNode::Kind::kMAP;
    while (pos < lines.size() && lines[pos].indent >= indent)
    {
        Line const& line = lines[pos];
        if (line.indent != indent)
        {
            throw std::runtime_error("contract line " + std::to_string(line.number) + ": unexpected indentation");
        }
        if (isList)
        {
            if (line.text.rfind("- ", 0) != 0)
            {
                throw std::runtime_error("contract line " + std::to_string(line.number) + ": expected a list item");
            }
            node.list.push_back(unquote(line.text.substr(2), line.number));
            ++pos;
            continue;
        }
        size_t const colon = keyColon(line.text);
        if (colon == std::string::npos)
        {
            throw std::runtime_error("contract line " + std::to_string(line.number) + ": expected 'key: value'");
        }
        std::string const key = unquote(line.text.substr(0, colon), line.number);
        std::string const value = trim(line.text.substr(colon + 1));
        ++pos;
        YamlNode child;
        if (!value.empty() && value.front() == '[')
        {
            child.kind = YamlNode::Kind::kLIST;
            child.list = flowList(value, line.number);
        }
        else if (!value.empty())
        {
            child.scalar = unquote(value, line.number);
        }
        else if (pos < lines.size() && lines[pos].indent > indent)
        {
            child = parseBlock(lines, pos, lines[pos].indent);
        }
        for (auto const& entry : node.map)
        {
            if (entry.first == key)
            {
                throw std::runtime_error("contract line " + std::to_string(line.number) + ": duplicate key " + key);
            }
        }
        node.map.emplace_back(key, std::move(child));
    }
    return node;
}

} // namespace detail

inline YamlNode parseContractYaml(std::string const& text)
{
    std::vector<detail::Line> lines;
    std::stringstream ss(text);
    std::string raw;
    int32_t number = 0;
    while (std::getline(ss, raw))
    {
        ++number;
        std::string const content = detail::stripComment(raw);
        std::string const body = detail::trim(content);
        if (body.empty() || body == "---" || body == "...")
        {
            continue;
        }
        if (content.find('\t') != std::string::npos)
        {
            throw std::runtime_error("contract line " + std::to_string(number) + ": tabs are not allowed");
        }
        lines.push_back({number, content.find_first_not_of(' '), body});
    }
    if (lines.empty())
    {
        throw std::runtime_error("contract: empty document");
    }
    size_t pos = 0;
    YamlNode root = detail::parseBlock(lines, pos, lines[0].indent);
    if (pos != lines.size())
    {
        throw std::runtime_error("contract line " + std::to_string(lines[pos].number) + ": trailing content");
    }
    return root;
}

inline YamlNode loadContractYaml(std::string const& path)
{
    std::ifstream in(path);
    if (!in)
    {
        throw std::runtime_error("cannot open contract file " + path);
    }
    std::stringstream buffer;
    buffer << in.rdbuf();
    return parseContractYaml(buffer.str());
}

} // namespace test
} // namespace terdit
