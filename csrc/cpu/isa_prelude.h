// Included by the ISA kernel files (kernels_avx2.cpp, kernels_avx512.cpp) *before* their
// `#pragma GCC target`: every standard and non-vector ATen header the kernels pull in.
// Defined here, outside the pragma, these get the baseline target. GCC 13 made
// std::allocator's members always_inline, and gives implicitly defined members (such as
// std::string's _Alloc_hider destructor) the baseline target even after the pragma, so a
// std header first seen under the pragma fails with "inlining failed in call to
// 'always_inline' ... target specific option mismatch" (seen on the GPU machine's g++ 13).
// Only at::vec (whose Vectorized<T> specialisations depend on the ISA macros) and the
// kernels themselves must come after the pragma.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
