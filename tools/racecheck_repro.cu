// Minimal kernels for the megakernel's compute-sanitizer racecheck reports (bench/gpu.sh stage `racerepro`).
// Each kernel uses one synchronization pattern of the megakernel, correctly, in a 256-thread block whose last warp
// plays the producer; racecheck's verdict on each tells which of its megakernel reports are about that pattern.
//   plain : a write by warp 0, __syncthreads, a read by warp 7 (control: must be clean)
//   named : the same after warps 0-6 synchronized once on their own named barrier (bar.sync 1, 224), as the
//           consumers do at every row group
//   ring  : a two-slot shared-memory ring filled by cp.async.bulk from warp 7 on "full" mbarriers, read by warps
//           0-6, which release each slot on an "empty" mbarrier the producer waits on before refilling it
//   ringbar: the ring, then the plain pattern (write by warp 0, __syncthreads, read by warp 7) after it
//   stage : the ring whose consumers, per slot, also sum into a shared stage behind their named barrier (as the
//           megakernel's row groups do); after the ring, __syncthreads and warp 7 reads the stage
//   ringall: the ring with every consumer lane arriving on "empty" (count 224) instead of lane 0 after __syncwarp
//   stagenb: stage without the named barrier (each warp's lane 0 sums into its own stage word)
//   stagesw: stage with a __syncwarp after the stage write
//   stageall: stage with every consumer lane arriving on "empty" (as ringall)
//   loop  : the megakernel's instruction loop in miniature: threads < 64 publish a descriptor, barrier, everyone
//           reads it while thread 0 spins on a global completion counter and warp 7 issues the next ring chunk,
//           barrier, consumers read the chunk and write a stage behind their named barrier, barrier, warp 7 reads
//           the stage, barrier, thread 0 releases the counter
// Build and run: nvcc -arch=sm_90a -o repro racecheck_repro.cu && compute-sanitizer --tool racecheck ./repro MODE
#include <cstdio>
#include <cstring>

__device__ __forceinline__ unsigned int su32(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned int parity) {
  asm volatile(
      "{\n .reg .pred P1;\n"
      "W_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      " @!P1 bra W_%=;\n"
      "}\n" ::"r"(su32(bar)),
      "r"(parity)
      : "memory");
}

// The two-slot ring of k_ring / k_loop: barrier init by thread 0 ("empty" counts `releases` arrivals), and the
// producer warp's issue of chunk `it` (waiting for the slot's release two chunks back).
__device__ __forceinline__ void ring_init(unsigned long long* full, unsigned long long* empty, int releases) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; i++) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(su32(full + i)) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(su32(empty + i)), "r"(releases) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}
__device__ __forceinline__ void ring_issue(int4 (*slot)[32], const int4* src, unsigned long long* full,
                                           unsigned long long* empty, int it) {
  const int s = it & 1;
  if (it >= 2) mbar_wait(empty + s, ((it >> 1) - 1) & 1);
  if ((threadIdx.x & 31) == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(su32(full + s)), "r"(512) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 512, [%2];" ::"r"(
            su32(slot[s])),
        "l"(src + 32 * it), "r"(su32(full + s))
        : "memory");
  }
  __syncwarp();
}

__global__ void k_plain(int* out) {
  __shared__ int x;
  if (threadIdx.x == 0) x = 7;
  __syncthreads();
  if (threadIdx.x == 224) out[0] = x;
}

__global__ void k_named(int* out) {
  __shared__ int x;
  if (threadIdx.x < 224) asm volatile("bar.sync 1, 224;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) x = 7;
  __syncthreads();
  if (threadIdx.x == 224) out[0] = x;
}

__global__ void k_ring(const int4* src, int* out, int iters, int mode) {
  __shared__ __align__(128) int4 slot[2][32];
  __shared__ int x, stage[7];
  __shared__ __align__(8) unsigned long long full[2], empty[2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool all = mode == 3 || mode == 6, stage_on = mode == 2 || mode >= 4, named = stage_on && mode != 4;
  ring_init(full, empty, all ? 224 : 7);
  __syncthreads();
  if (warp == 7) {
    for (int it = 0; it < iters; it++) ring_issue(slot, src, full, empty, it);
  } else {
    int acc = 0;
    for (int it = 0; it < iters; it++) {
      const int s = it & 1;
      mbar_wait(full + s, (it >> 1) & 1);
      const int v = slot[s][lane].x;
      acc += v;
      if (all) {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(su32(empty + s)) : "memory");
      } else {
        __syncwarp();
        if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(su32(empty + s)) : "memory");
      }
      if (stage_on) {
        if (named) asm volatile("bar.sync 1, 224;" ::: "memory");
        if (lane == 0) stage[warp] = (it == 0 ? 0 : stage[warp]) + v;
        if (mode == 5) __syncwarp();
      }
    }
    atomicAdd(out, acc);
  }
  if (stage_on) {
    __syncthreads();
    if (threadIdx.x == 224) {
      int t = 0;
      for (int w = 0; w < 7; w++) t += stage[w];
      out[1] = t;
    }
  }
  if (mode == 1) {
    __syncthreads();
    if (threadIdx.x == 0) x = 7;
    __syncthreads();
    if (threadIdx.x == 224) atomicAdd(out + 1, x);
  }
}

__global__ void k_loop(const int4* src, int* out, unsigned int* done, int iters) {
  __shared__ __align__(128) int4 slot[2][32];
  __shared__ int cur[64], stage[7];
  __shared__ __align__(8) unsigned long long full[2], empty[2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  ring_init(full, empty, 7);
  int nxt = threadIdx.x < 64 ? (int)threadIdx.x : 0;
  for (int it = 0; it < iters; it++) {
    const int s = it & 1;
    if (threadIdx.x < 64) cur[threadIdx.x] = nxt + it;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int v;
      do {
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(done) : "memory");
        if (v < (unsigned int)it) __nanosleep(32);
      } while (v < (unsigned int)it);
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    } else if (warp == 7 && cur[0] >= 0) {
      ring_issue(slot, src, full, empty, it);
    }
    __syncthreads();
    if (warp < 7) {
      mbar_wait(full + s, (it >> 1) & 1);
      const int v = slot[s][lane].x + cur[1];
      __syncwarp();
      if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(su32(empty + s)) : "memory");
      asm volatile("bar.sync 1, 224;" ::: "memory");
      if (lane == 0) stage[warp] = v;
    }
    __syncthreads();
    if (threadIdx.x == 224) {
      int t = cur[2];
      for (int w = 0; w < 7; w++) t += stage[w];
      out[0] += t;
    }
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(done) : "memory");
  }
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "plain";
  const int iters = 8;
  int *out, host = 0;
  int4* src;
  cudaMalloc(&out, 2 * sizeof(int));
  cudaMemset(out, 0, 2 * sizeof(int));
  cudaMalloc(&src, sizeof(int4) * 32 * iters);
  int4 h[32 * iters];
  for (int i = 0; i < 32 * iters; i++) h[i] = make_int4(i, 0, 0, 0);
  cudaMemcpy(src, h, sizeof(h), cudaMemcpyHostToDevice);
  if (!strcmp(mode, "plain")) k_plain<<<1, 256>>>(out);
  else if (!strcmp(mode, "named")) k_named<<<1, 256>>>(out);
  else if (!strcmp(mode, "ring")) k_ring<<<1, 256>>>(src, out, iters, 0);
  else if (!strcmp(mode, "ringbar")) k_ring<<<1, 256>>>(src, out, iters, 1);
  else if (!strcmp(mode, "stage")) k_ring<<<1, 256>>>(src, out, iters, 2);
  else if (!strcmp(mode, "ringall")) k_ring<<<1, 256>>>(src, out, iters, 3);
  else if (!strcmp(mode, "stagenb")) k_ring<<<1, 256>>>(src, out, iters, 4);
  else if (!strcmp(mode, "stagesw")) k_ring<<<1, 256>>>(src, out, iters, 5);
  else if (!strcmp(mode, "stageall")) k_ring<<<1, 256>>>(src, out, iters, 6);
  else if (!strcmp(mode, "loop")) {
    unsigned int* done;
    cudaMalloc(&done, sizeof(unsigned int));
    cudaMemset(done, 0, sizeof(unsigned int));
    k_loop<<<1, 256>>>(src, out, done, iters);
  } else {
    fprintf(stderr, "mode: plain | named | ring | ringbar | stage | ringall | stagenb | stagesw | stageall | loop\n");
    return 2;
  }
  const cudaError_t e = cudaDeviceSynchronize();
  cudaMemcpy(&host, out, sizeof(int), cudaMemcpyDeviceToHost);
  // ring: 7 consumer warps each add every element of every slot: 7 * sum(0 .. 32 iters - 1).
  int want = !strcmp(mode, "plain") || !strcmp(mode, "named") ? 7 : 7 * (32 * iters) * (32 * iters - 1) / 2;
  if (!strcmp(mode, "loop")) {
    // Per iteration: 7 warps' lane-0 values (32 it + 1 + it) plus the descriptor word cur[2] = 2 + it.
    want = 0;
    for (int it = 0; it < iters; it++) want += 7 * (33 * it + 1) + 2 + it;
  }
  printf("%s: %s, out %d (want %d)\n", mode, cudaGetErrorString(e), host, want);
  return e == cudaSuccess && host == want ? 0 : 1;
}
