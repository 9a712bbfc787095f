// Emulation stand-in: see fake_cuda.h.
#pragma once
#include "fake_cuda.h"
