// CUDA registrations of every stablenets op. The definitions live in
// entry.cuh (checks, regime choice), narrow_*.cuh/.h and wide*.cuh.
#include <torch/library.h>

#include "entry.cuh"

TORCH_LIBRARY_IMPL(stablenets, CUDA, m) { SN_REGISTER_DENSE_OPS(m); }
