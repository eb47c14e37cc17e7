// LS_HOST_DEVICE: a function both the CPU (.cpp) and the CUDA (.cu) code compile: __host__ __device__ and inlined
// under nvcc, plain inline elsewhere. The one definition, for the headers that the two devices share.
#pragma once

#if defined(__CUDACC__)
#define LS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LS_HOST_DEVICE inline
#endif
