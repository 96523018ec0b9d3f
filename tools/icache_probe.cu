// Instruction-cache probe: how fast one SM runs straight-line code of a given size, cold (first pass) and when the
// same code runs again (later passes), for 1, 4 and 8 warps executing it together. The megakernel runs ~150 KB of
// per-layer code once per layer; this says at which code size the SM's instruction caches stop holding a loop
// body, and what a miss costs (bench/NOTES.md, session 17).
//   nvcc -arch=sm_90a -O3 -o icache_probe tools/icache_probe.cu && ./icache_probe
// Body: KB x 64 FFMAs (16 bytes of SASS each) on four independent chains with runtime operands (nothing folds).
#include <cstdio>
#include <cuda_runtime.h>

// One KB of SASS: 64 FFMAs on four chains (volatile asm: nvcc's unroll limit caps a loop at 4096 instructions, and
// nothing may merge them).
#define FMA1(a) asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a) : "f"(m), "f"(c))
#define FMA4 FMA1(a0); FMA1(a1); FMA1(a2); FMA1(a3)
#define FMA16 FMA4; FMA4; FMA4; FMA4
#define FMA64 FMA16; FMA16; FMA16; FMA16
template <int N>
__device__ __forceinline__ void kb_blocks(float& a0, float& a1, float& a2, float& a3, float m, float c) {
  if constexpr (N > 0) {
    FMA64;
    kb_blocks<N - 1>(a0, a1, a2, a3, m, c);
  }
}

template <int KB>
__global__ void body(float* out, float m, float c, int reps, long long* cyc) {
  float a0 = out[threadIdx.x], a1 = a0 + 1.f, a2 = a0 + 2.f, a3 = a0 + 3.f;
  long long t0 = clock64(), first = 0;
  for (int r = 0; r < reps; r++) {
    kb_blocks<KB>(a0, a1, a2, a3, m, c);
    if (r == 0) first = clock64() - t0;
  }
  const long long total = clock64() - t0;
  out[threadIdx.x] = a0 + a1 + a2 + a3;
  if (threadIdx.x == 0) { cyc[0] = first; cyc[1] = total - first; }
}

template <int KB>
void run(float* out, long long* cyc, int warps) {
  const int reps = 9;
  body<KB><<<1, 32 * warps>>>(out, 0.999f, 0.001f, reps, cyc);
  long long h[2];
  cudaMemcpy(h, cyc, sizeof h, cudaMemcpyDeviceToHost);
  const double n = KB * 64.0;  // FFMAs per pass (loop overhead aside)
  printf("%5d KB  %d warps  cold %6.2f  warm %6.2f cycles per instruction per warp\n", KB, warps,
         h[0] / n / 1.0, h[1] / n / (reps - 1));
}

int main() {
  float* out;
  long long* cyc;
  cudaMalloc(&out, 1024 * sizeof(float));
  cudaMalloc(&cyc, 2 * sizeof(long long));
  cudaMemset(out, 0, 1024 * sizeof(float));
  for (int w : {1, 4, 8}) {
    run<4>(out, cyc, w); run<8>(out, cyc, w); run<16>(out, cyc, w); run<24>(out, cyc, w); run<32>(out, cyc, w);
    run<48>(out, cyc, w); run<64>(out, cyc, w); run<96>(out, cyc, w); run<112>(out, cyc, w); run<128>(out, cyc, w);
    run<144>(out, cyc, w); run<160>(out, cyc, w); run<192>(out, cyc, w); run<256>(out, cyc, w);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
