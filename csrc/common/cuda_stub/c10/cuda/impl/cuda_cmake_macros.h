// Stand-in for the header that a CUDA build of torch generates at configure time. The CPU wheel
// ships the other c10/cuda headers but not this one; `make cuda-check` puts this folder on the
// include path so that the .cu files compile against a CPU torch. Never used by a real CUDA build.
#pragma once
