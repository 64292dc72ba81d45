// CPU emulation of the few CUDA runtime pieces the TernaryMatMul sources use (see emu.h).
#pragma once
#include "emu.h"
