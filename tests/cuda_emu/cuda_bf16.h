// The emulator (cuda_emu.h) stands in for the CUDA toolkit header of this name.
#pragma once
#include "cuda_emu.h"
