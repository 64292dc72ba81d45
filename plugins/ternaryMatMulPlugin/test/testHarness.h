/*
 * Minimal check helpers shared by the plugin's C++ tests: a failed check is reported with its
 * location and the test goes on, so one run lists every failure; main returns the failure count.
 */
#pragma once

#include <cstdint>
#include <iostream>
#include <string>

namespace terdit
{
namespace test
{

inline int32_t& failureCount()
{
    static int32_t count = 0;
    return count;
}

inline int32_t& checkCount()
{
    static int32_t count = 0;
    return count;
}

inline void report(bool ok, char const* what, char const* file, int32_t line, std::string const& detail = {})
{
    ++checkCount();
    if (!ok)
    {
        ++failureCount();
        std::cerr << file << ":" << line << ": check failed: " << what;
        if (!detail.empty())
        {
            std::cerr << " (" << detail << ")";
        }
        std::cerr << "\n";
    }
}

//! Calls fn and checks that it throws an exception of type E whose what() contains needle.
template <typename E, typename Fn>
void expectThrows(Fn&& fn, std::string const& needle, char const* what, char const* file, int32_t line)
{
    try
    {
        fn();
    }
    catch (E const& e)
    {
        std::string const message = e.what();
        report(message.find(needle) != std::string::npos, what, file, line,
            "message '" + message + "' lacks '" + needle + "'");
        return;
    }
    catch (std::exception const& e)
    {
        report(false, what, file, line, std::string{"threw another exception type: "} + e.what());
        return;
    }
    report(false, what, file, line, "did not throw");
}

inline int32_t summarize(char const* name)
{
    std::cout << name << ": " << checkCount() - failureCount() << " checks passed, " << failureCount()
              << " failed\n";
    return failureCount() == 0 ? 0 : 1;
}

} // namespace test
} // namespace terdit

#define TEST_CHECK(cond) ::terdit::test::report(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
#define TEST_CHECK_MSG(cond, detail) ::terdit::test::report(static_cast<bool>(cond), #cond, __FILE__, __LINE__, detail)
#define TEST_THROWS(E, expr, needle)                                                                                   \
    ::terdit::test::expectThrows<E>([&]() { (void) (expr); }, needle, #expr, __FILE__, __LINE__)
