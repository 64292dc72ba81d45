// Test-only C entry point of the emulated kernel library (emulator.py compiles it beside the
// kernels' C ABI): terdit::lastKernelPath() for drive.py, which checks after every call that the
// kernel family the case claims to cover is the one that ran.
#include "ternaryMatmul.h"

extern "C" __attribute__((visibility("default"))) int terditEmuLastKernelPath()
{
    return static_cast<int>(terdit::lastKernelPath());
}
