# Build-time helper: writes ternaryMatMulKernelFeatures.h, which tells the plugin what the linked
# kernels library defines. TERDIT_KERNELS_HAVE_FP8 is 1 when the library defines
# terdit::launchQuantizeRowsE4m3 with the signature of ternaryMatmul.h (the W1.58A8 path,
# act_quant="fp8"); the plugin then calls it, otherwise it refuses act_quant="fp8" with a message.
# The header is rewritten only when its content changes, so the plugin is not recompiled needlessly.
#   cmake -DNM=<nm> -DLIBRARY=<libterdit_kernels_static.a> -DOUTPUT=<header> -P kernelFeatures.cmake
cmake_minimum_required(VERSION 3.24)

if(NOT NM OR NOT LIBRARY OR NOT OUTPUT)
    message(FATAL_ERROR "usage: cmake -DNM=<nm> -DLIBRARY=<kernels library> -DOUTPUT=<header> -P kernelFeatures.cmake")
endif()

execute_process(COMMAND ${NM} --defined-only ${LIBRARY}
    OUTPUT_VARIABLE symbols ERROR_VARIABLE errors RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "'${NM} --defined-only ${LIBRARY}' failed with ${rc}: ${errors}")
endif()
if(NOT symbols MATCHES "launchTernaryMatmul")
    message(FATAL_ERROR "${LIBRARY} defines no launchTernaryMatmul: not the TerDiT kernels library")
endif()

# terdit::launchQuantizeRowsE4m3(void const*, DataType, int64_t, int32_t, uint8_t*, float*, cudaStream_t),
# mangled (namespace, name, then the parameter types): a definition with another signature would not
# link, so it does not count.
set(quantize_symbol "_ZN6terdit22launchQuantizeRowsE4m3EPKvNS_8DataTypeEliPhPfP11CUstream_st")
if(symbols MATCHES "[0-9a-fA-F]+ [TtWw] ${quantize_symbol}")
    set(have_fp8 1)
    set(note "defines terdit::launchQuantizeRowsE4m3: act_quant='fp8' is supported")
else()
    set(have_fp8 0)
    set(note "does not define terdit::launchQuantizeRowsE4m3: act_quant='fp8' is refused with a message")
endif()

set(content "// Generated from ${LIBRARY} by kernelFeatures.cmake; do not edit.\n\
// The kernels library ${note}.\n\
#pragma once\n\
#define TERDIT_KERNELS_HAVE_FP8 ${have_fp8}\n")
set(previous "")
if(EXISTS ${OUTPUT})
    file(READ ${OUTPUT} previous)
endif()
if(NOT previous STREQUAL content)
    file(WRITE ${OUTPUT} "${content}")
endif()
message(STATUS "TerDiT kernels library ${note}")
