// Warpgroup-MMA weight-streaming probe: can a ring of bulk copies feeding wgmma consumers run a T = 1 matrix-vector
// product at the HBM rate, where the megakernel's mma.sync consumers (ring_consume) manage ~55-70 %?
//
// One persistent block per SM streams its share of a weight matrix through a shared-memory ring (one producer warp,
// one 32 KB bulk copy per chunk, mbarriers), and NWG consumer warpgroups multiply each chunk with the activation
// vector by `wgmma.mma_async` (8-bit float inputs, f32 accumulation; activations E4M3):
//   f8  FP8 weights with f32 block scales per 128 columns (the plan's FP8 layout): A straight from the slot by a
//       matrix descriptor (128-byte swizzle, the runtime would pre-tile the weights so), no decoding at all;
//   fp4 MXFP4 weights with E8M0 scales per 32 columns: each thread loads its 16 codes a K step, turns them into
//       E5M2 in registers (4 instructions per 8 codes, see fp4_fp8) and issues the register-A form.
// The activation vector rides the MMA's N dimension as 6 E4M3 terms (x ~ sum_j a_j / s_j, each term the rounding
// of what the ones before left, its own power-of-two scale s_j), so the f32 activations keep ~24 bits while the
// tensor cores see 8-bit inputs; columns 6 and 7 are zero.
// Every result is checked against a double-precision host reference, and the rate is given as a fraction of the
// device-to-device copy bandwidth measured in the same run. Modes: full (copies + MMAs), nocopy (the consumers
// alone: slots are completed without copying), nocompute (the ring alone).
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -o wgmma_probe tools/wgmma_probe.cu && ./wgmma_probe probe.json
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));       \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

constexpr int K = 4096;         // columns (hidden size)
constexpr int NS = 4;           // ring slots
constexpr int WB = 32768;       // weight bytes per chunk
constexpr int NTERM = 6;        // E4M3 terms of the activation vector (MMA columns 0..5)
constexpr int BT_BYTES = K * 8;  // activation tile: [K / 128][8 columns][128 B], 128-byte swizzle

enum Mode { FULL = 0, NOCOPY = 1, NOCOMPUTE = 2 };
// Consumer kinds: FP8 by wgmma (A from shared memory), MXFP4 by wgmma (A from registers), and the baseline: MXFP4
// by mma.sync m16n8k16 on f16 (the megakernel's method: codes placed as f16 bits, activations as f16 hi + lo in
// columns 0 and 1), each warp owning 16 rows of the chunk as in the wgmma kinds.
enum Kind { KF8 = 0, KFP4 = 1, KFP4MS = 2, KF8P = 3, KFP4KS = 4 };
// KFP4KS: the baseline's arithmetic in v22's ring geometry: 32-row x 1 KB chunks, 7 consumer warps splitting each
// chunk's 64 K steps between them (round robin, rotating by chunk) for both 16-row tiles, and per 32-row group a
// cross-warp sum (partials into a double buffer, one consumer barrier, one warp adds them up).

// ---------------------------------------------------------------------------------------------------------------
// Device helpers
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
  asm volatile(
      "{\n .reg .pred P1;\n"
      "W_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      " @!P1 bra W_%=;\n"
      "}\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
// Matrix descriptor of a K-major operand with the 128-byte swizzle: 8-row atoms of 1 KB (stride 1024 bytes).
__device__ __forceinline__ unsigned long long sw128_desc(unsigned saddr) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
         (1ull << 62);
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Pins an accumulator's registers at this point of the program (nothing that reads or writes them moves across:
// the asynchronous MMAs write them between issue and wait).
__device__ __forceinline__ void fence4(float (&r)[4]) {
  asm volatile("" : "+f"(r[0]), "+f"(r[1]), "+f"(r[2]), "+f"(r[3])::"memory");
}
// Shared-memory loads by 32-bit address.
__device__ __forceinline__ unsigned lds8(unsigned a) {
  unsigned short v;
  asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ unsigned lds32(unsigned a) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ uint2 lds64(unsigned a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ uint4 lds128(unsigned a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
// acc += t scaled per row: columns of row r0 (t[0], t[1]) by sa, of row r0 + 8 (t[2], t[3]) by sb.
__device__ __forceinline__ void scale_add(float (&acc)[4], const float (&t)[4], float sa, float sb) {
  acc[0] += t[0] * sa;
  acc[1] += t[1] * sa;
  acc[2] += t[2] * sb;
  acc[3] += t[3] * sb;
}
// D (64 x 8 f32) (+)= A (64 x 32 E4M3, shared) * B (32 x 8 E4M3, shared).
__device__ __forceinline__ void wgmma_ss(float (&d)[4], unsigned long long da, unsigned long long db, int acc) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %6, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, %4, %5, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "l"(da), "l"(db), "r"(acc));
}
// A (E5M2) from registers (this thread's fragment: rows g, g + 8 of its warp's 16, columns 4t..4t+3 and
// 16+4t..16+4t+3).
__device__ __forceinline__ void wgmma_rs(float (&d)[4], const unsigned (&a)[4], unsigned long long db) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e5m2.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(0));
}
// MXFP4 codes of one thread word (device layout, see fp4_layout on the host) -> two E5M2 x4 registers, each code
// (s, e1, e0, m) placed at byte bits (7, 3, 2, 1): the E5M2 of its value times 2^-14 (subnormals included). The
// four codes of lo are one mask away; hi's sit where one 32 x 32 -> 64-bit multiply by 2^4 + 2^31 puts each bit
// once into the mask (low word: << 4 and << 31, high word: >> 28 and >> 1; no two copies overlap, so no carries).
// (E4M3, bits (7, 4, 3, 2), has no such two-shift placement: a searched-for fact, see bench/NOTES.md.)
#define FP4E_MASK 0x8E8E8E8Eu
__host__ __device__ __forceinline__ void fp4_fp8(unsigned w, unsigned& lo, unsigned& hi) {
  lo = w & FP4E_MASK;
  const unsigned long long t = (unsigned long long)(w & ~FP4E_MASK) * 0x80000010ull;
  hi = ((unsigned)t | (unsigned)(t >> 32)) & FP4E_MASK;
}

// The baseline's decode (the megakernel's MK_FP4R form): a word's 8 codes as four f16x2 pairs, each code placed at
// f16 bits (9, 10, 11, 15) of its half (the f16 of its value times 2^-14) by a mask, a shift, one multiply and the two
// halves of one 64-bit multiply.
#define FP4H_MASK 0x8E008E00u
__host__ __device__ __forceinline__ void fp4_f16(unsigned w, unsigned (&p)[4]) {
  p[0] = w & FP4H_MASK;
  p[1] = (w << 8) & FP4H_MASK;
  p[2] = ((w & 0x00710071u) * 0x240u) & FP4H_MASK;
  const unsigned long long t = (unsigned long long)(w & 0x71007100u) * 0x24000u;
  p[3] = ((unsigned)t | (unsigned)(t >> 32)) & FP4H_MASK;
}
__device__ __forceinline__ void mma_f16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                        unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// One K step of the mma.sync kinds: the thread's words of rows r0 (w0) and r0 + 8 (w1) decoded to f16, two MMAs
// against the step's activation fragment b, scaled by the rows' E8M0 bytes (times 2^14 for the f16 placement).
__device__ __forceinline__ void f16_step(float (&acc)[4], unsigned w0, unsigned w1, uint4 b, unsigned e0, unsigned e1) {
  unsigned pa[4], pb[4];
  fp4_f16(w0, pa);
  fp4_f16(w1, pb);
  float th[4] = {0.f, 0.f, 0.f, 0.f};
  mma_f16(th, pa[0], pb[0], pa[1], pb[1], b.x, b.y);
  mma_f16(th, pa[2], pb[2], pa[3], pb[3], b.z, b.w);
  scale_add(acc, th, __uint_as_float((e0 + 14u) << 23), __uint_as_float((e1 + 14u) << 23));
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel. FP4: chunk = [K step pair][RB rows][4 threads][2 words] (RB rows x 512 code bytes), then the chunk's
// E8M0 scales [32 steps][RB rows]. F8: chunk = [128-column block][RB rows][128 B] (swizzled 8-row atoms).
template <int KIND, int NWG>
struct Geo {
  static constexpr bool KSPLIT = KIND == KFP4KS;
  static constexpr bool FP4 = KIND == KFP4 || KIND == KFP4MS || KSPLIT;
  static constexpr bool F16B = KIND == KFP4MS || KSPLIT;     // f16 hi / lo activations (mma.sync)
  static constexpr int CW = KSPLIT ? 7 : NWG * 4;            // consumer warps
  static constexpr int RB = KSPLIT ? 32 : 64 * NWG;          // rows per chunk
  static constexpr int KCB = WB / RB;                        // weight bytes of a row per chunk
  static constexpr int KCE = FP4 ? 2 * KCB : KCB;            // elements of a row per chunk
  static constexpr int KS = K / KCE;                         // chunks per row block
  static constexpr int SCB = FP4 ? RB * (KCE / 32) : 0;      // scale bytes per chunk (FP4)
  static constexpr int CB = WB + SCB;                        // bytes per chunk
  static constexpr int SLOT = (CB + 1023) / 1024 * 1024;
  static constexpr int BT = F16B ? K / 32 * 512 : BT_BYTES;  // activation tile bytes
  static constexpr int RED = KSPLIT ? 2 * 7 * 32 * 8 * 4 : 0;  // KSPLIT's partial sums
  static constexpr int SMEM = NS * SLOT + BT + RED + 1024;   // + alignment slack
  // Byte of MXFP4 K step st's word of thread t for chunk row rr (KSPLIT: [step][row][t]; else [step pair][row][t][2]).
  __host__ __device__ static constexpr int word_off(int st, int rr, int t) {
    return KSPLIT ? (st * RB + rr) * 16 + t * 4 : (st >> 1) * RB * 32 + rr * 32 + t * 8 + (st & 1) * 4;
  }
};

template <int KIND, int NWG>
__global__ void __launch_bounds__(Geo<KIND, NWG>::CW * 32 + 32, 1)
    probe(const uint8_t* __restrict__ w, const float* __restrict__ f8s, const uint8_t* __restrict__ bt,
          const float* __restrict__ inv_s, int nrb, float* __restrict__ y, int mode, int sync,
          unsigned* __restrict__ cnt) {
  using G = Geo<KIND, NWG>;
  constexpr bool FP4 = G::FP4;
  extern __shared__ uint8_t dsm[];
  __shared__ __align__(8) unsigned long long full[NS], empty[NS];
  uint8_t* base = (uint8_t*)(((uintptr_t)dsm + 1023) & ~(uintptr_t)1023);
  uint8_t* ring = base;
  uint8_t* btile = base + NS * G::SLOT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nthreads = G::CW * 32;
  if (tid == 0) {
    for (int i = 0; i < NS; i++) {
      mbar_init(full + i, 1);
      mbar_init(empty + i, nthreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The activation tile (already in swizzled order) into shared memory, then visible to the async proxy.
  for (int i = tid; i < G::BT / 16; i += blockDim.x)
    reinterpret_cast<uint4*>(btile)[i] = reinterpret_cast<const uint4*>(bt)[i];
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  // This block's row blocks: b, b + G, ...
  const int nmine = nrb > (int)blockIdx.x ? (nrb - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
  const int nchunks = nmine * G::KS;
  if (warp == G::CW) {  // producer
    if (lane == 0) {
      for (int n = 0; n < nchunks; n++) {
        const int slot = n % NS;
        if (n >= NS) mbar_wait(empty + slot, ((n / NS) - 1) & 1);
        const int rb = (int)blockIdx.x + (n / G::KS) * (int)gridDim.x, s = n % G::KS;
        // sync 1: the producer also waits at each row-block boundary for every block's previous row block (a
        // megakernel instruction boundary where the ring does not run ahead); sync 2: it runs ahead.
        if (sync == 1 && s == 0 && n > 0) {
          while (ld_acquire(cnt + n / G::KS - 1) < gridDim.x) {
          }
        }
        if (mode == NOCOPY) {
          mbar_arrive(full + slot);
        } else {
          mbar_expect(full + slot, G::CB);
          const uint8_t* src = w + ((long long)rb * G::KS + s) * G::CB;
          bulk_g2s(ring + slot * G::SLOT, src, G::CB, full + slot);
        }
      }
    }
    return;
  }
  const int wg = warp >> 2, wi = warp & 3, gq = lane >> 2, tq = lane & 3;
  const unsigned bbase = smem_u32(btile);
  float acc[4];
  float acc2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // KSPLIT: both row tiles' partials
  int n = 0;
  for (int j = 0; j < nmine; j++) {
    const int rb = (int)blockIdx.x + j * (int)gridDim.x;
    const int r0 = wg * 64 + wi * 16 + gq;  // this thread's rows in the chunk: r0, r0 + 8
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    for (int s = 0; s < G::KS; s++, n++) {
      const int slot = n % NS;
      mbar_wait(full + slot, (n / NS) & 1);
      uint8_t* sp = ring + slot * G::SLOT;
      if (mode != NOCOMPUTE) {
        if constexpr (!FP4) {
          // Groups of PER k32 MMAs (PER = 4: a 128-column scale block; 1 with KF8P) into t[g & 1], then the previous
          // group's t scaled into acc: the tensor cores' FP8 sums keep fewer bits than f32, so shorter groups are
          // more exact. Descriptors advance by adding the byte offset / 16 to the address field (no carry below 256 KB).
          constexpr int PER = KIND == KF8P ? 1 : 4, NG = G::KCB / 32 / PER;
          const unsigned long long da0 = sw128_desc(smem_u32(sp) + wg * 64 * 128), db0 = sw128_desc(bbase);
          const long long srow0 = ((long long)rb * G::RB + r0) * (K / 128), srow1 = srow0 + 8 * (K / 128);
          float t[2][4];
          float sc[2][2];
#pragma unroll
          for (int g = 0; g < NG; g++) {
            const int q = g * PER / 4, kb = s * (G::KCB / 128) + q;  // the group's 128-column block
            sc[g & 1][0] = __ldg(f8s + srow0 + kb);
            sc[g & 1][1] = __ldg(f8s + srow1 + kb);
            fence4(t[g & 1]);
            wg_fence();
#pragma unroll
            for (int i = 0; i < PER; i++) {
              const int kk = (g * PER + i) % 4;
              wgmma_ss(t[g & 1], da0 + ((q * G::RB * 128 + kk * 32) >> 4), db0 + ((kb * 1024 + kk * 32) >> 4), i);
            }
            wg_commit();
            if (g > 0) {
              wg_wait<1>();
              const int p = (g - 1) & 1;
              fence4(t[p]);
              scale_add(acc, t[p], sc[p][0], sc[p][1]);
            }
          }
          wg_wait<0>();
          constexpr int p = (NG - 1) & 1;
          fence4(t[p]);
          scale_add(acc, t[p], sc[p][0], sc[p][1]);
        } else if constexpr (G::KSPLIT) {
          const unsigned cb = smem_u32(sp);
          for (int st = (warp + 7 - n % 7) % 7; st < 64; st += 7) {
            const int ks = s * 64 + st;
            const uint4 b = lds128(bbase + ((ks * 8 + gq) * 4 + tq) * 16);
#pragma unroll
            for (int rt = 0; rt < 2; rt++)
              f16_step(acc2[rt], lds32(cb + G::word_off(st, rt * 16 + gq, tq)),
                       lds32(cb + G::word_off(st, rt * 16 + gq + 8, tq)), b, lds8(cb + WB + st * 32 + rt * 16 + gq),
                       lds8(cb + WB + st * 32 + rt * 16 + gq + 8));
          }
        } else if constexpr (KIND == KFP4MS) {
          // Baseline: per K step two mma.sync (k 0-15, 16-31), f16 weights decoded from the thread's two words.
          const unsigned wbase = smem_u32(sp) + r0 * 32 + tq * 8;
          const unsigned sbase = smem_u32(sp) + WB + r0;
          constexpr int NST = G::KCE / 32;
#pragma unroll 1
          for (int st = 0; st < NST; st += 2) {
            const uint2 w0 = lds64(wbase + (st >> 1) * G::RB * 32), w1 = lds64(wbase + (st >> 1) * G::RB * 32 + 8 * 32);
#pragma unroll
            for (int h = 0; h < 2; h++) {
              const int ks = s * (G::KCE / 32) + st + h;  // global K step
              f16_step(acc, h ? w0.y : w0.x, h ? w1.y : w1.x, lds128(bbase + ((ks * 8 + gq) * 4 + tq) * 16),
                       lds8(sbase + (st + h) * G::RB), lds8(sbase + (st + h) * G::RB + 8));
            }
          }
        } else {
          // K steps in pairs: this thread's two rows' code words for both steps in one 8-byte load each.
          const unsigned wbase = smem_u32(sp) + r0 * 32 + tq * 8;
          const unsigned sbase = smem_u32(sp) + WB + r0;
          const unsigned long long db0 = sw128_desc(bbase);
          float t[2][4];
          unsigned a[2][4];
          float sc[2][2];
          constexpr int NST = G::KCE / 32;
#pragma unroll 1
          for (int st = 0; st < NST; st += 2) {
            const uint2 w0 = lds64(wbase + (st >> 1) * G::RB * 32), w1 = lds64(wbase + (st >> 1) * G::RB * 32 + 8 * 32);
            unsigned e[4];
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
              for (int rr = 0; rr < 2; rr++) e[h * 2 + rr] = lds8(sbase + (st + h) * G::RB + rr * 8);
            const int kg = s * G::KCE + st * 32;  // global column of step st
#pragma unroll
            for (int h = 0; h < 2; h++) {
              // The 2^14 of the E5M2 placement folds into the E8M0 scale: 2^(e - 113).
              sc[h][0] = __uint_as_float((e[h * 2] + 14u) << 23);
              sc[h][1] = __uint_as_float((e[h * 2 + 1] + 14u) << 23);
              fp4_fp8(h ? w0.y : w0.x, a[h][0], a[h][2]);
              fp4_fp8(h ? w1.y : w1.x, a[h][1], a[h][3]);
              const int k = kg + h * 32;
              t[h][0] = t[h][1] = t[h][2] = t[h][3] = 0.f;
              fence4(t[h]);
              wg_fence();
              wgmma_rs(t[h], a[h], db0 + ((unsigned)((k >> 7) * 1024 + (k & 127)) >> 4));
              wg_commit();
              if (h == 1) {
                wg_wait<1>();  // step st done
                fence4(t[0]);
                scale_add(acc, t[0], sc[0][0], sc[0][1]);
              }
            }
            wg_wait<0>();  // step st + 1 done (its registers are reused next pair)
            fence4(t[1]);
            scale_add(acc, t[1], sc[1][0], sc[1][1]);
          }
        }
      }
      mbar_arrive(empty + slot);
    }
    if constexpr (G::KSPLIT) {
      // The group's cross-warp sum: partials into half j & 1, one consumer barrier, warp j % 7 adds them up (the
      // next group writes the other half; the one after passes the next barrier first).
      float* red = reinterpret_cast<float*>(btile + G::BT) + (j & 1) * (7 * 32 * 8);
#pragma unroll
      for (int rt = 0; rt < 2; rt++) {
        float* r = red + (warp * 32 + rt * 16 + gq) * 8 + 2 * tq;
        r[0] = acc2[rt][0];
        r[1] = acc2[rt][1];
        r[64] = acc2[rt][2];
        r[65] = acc2[rt][3];
#pragma unroll
        for (int e = 0; e < 4; e++) acc2[rt][e] = 0.f;
      }
      asm volatile("bar.sync 1, %0;" ::"n"(G::CW * 32) : "memory");
      if (warp == j % 7) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < 7; w++) v += red[(w * 32 + lane) * 8] * inv_s[0] + red[(w * 32 + lane) * 8 + 1] * inv_s[1];
        if (mode == FULL) y[(long long)rb * G::RB + lane] = v;
      }
    } else {
    // Columns -> the terms' sum: lane t holds columns 2t, 2t + 1 of rows r0 and r0 + 8.
    float v0 = acc[0] * inv_s[2 * tq] + acc[1] * inv_s[2 * tq + 1];
    float v1 = acc[2] * inv_s[2 * tq] + acc[3] * inv_s[2 * tq + 1];
    v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
    v0 += __shfl_xor_sync(0xffffffffu, v0, 2);
    v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
    v1 += __shfl_xor_sync(0xffffffffu, v1, 2);
    if (tq == 0 && mode == FULL) {
      y[(long long)rb * G::RB + r0] = v0;
      y[(long long)rb * G::RB + r0 + 8] = v1;
    }
    }
    if (sync) {  // every block's row block j done before any block's consumers go on (a dependency between steps)
      asm volatile("bar.sync 1, %0;" ::"n"(G::CW * 32) : "memory");
      if (tid == 0) {
        __threadfence();
        atomicAdd(cnt + j, 1u);
        while (ld_acquire(cnt + j) < gridDim.x) {
        }
      }
      asm volatile("bar.sync 1, %0;" ::"n"(G::CW * 32) : "memory");
    }
  }
}

// The median of n runs of f, each timed between two events, after `warm` untimed runs and a device synchronize;
// pre() runs before every run, untimed.
template <class Pre, class F>
static float median_ms(int warm, int n, Pre pre, F f) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < warm; i++) {
    pre();
    f();
  }
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> ts;
  for (int i = 0; i < n; i++) {
    pre();
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Device-to-device copy kernel bandwidth is measured with cudaMemcpy (read + write bytes / time).
static double copy_bw(size_t bytes) {
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  const float ms = median_ms(3, 10, [] {}, [&] { CK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

static float e4m3_val(uint8_t b) {
  __nv_fp8_e4m3 v;
  v.__x = b;
  return (float)v;
}
static uint8_t e4m3_of(float f) { return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3); }
static const float FP4V[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};

// Where fp4_fp8 takes each output bit from: src[p] = the word bit that lands at output bit p (p < 32: lo,
// p >= 32: hi), found by running the decode on single bits.
static void fp4_layout(int (&src)[64]) {
  for (int p = 0; p < 64; p++) src[p] = -1;
  for (int x = 0; x < 32; x++) {
    unsigned lo, hi;
    fp4_fp8(1u << x, lo, hi);
    for (int p = 0; p < 32; p++) {
      if (lo >> p & 1) src[p] = x;
      if (hi >> p & 1) src[32 + p] = x;
    }
  }
}
static float e5m2_val(uint8_t b) {
  __nv_fp8_e5m2 v;
  v.__x = b;
  return (float)v;
}

struct Result {
  const char* name;
  double ms[3], gbs[3], frac[3], max_rel, rms_rel;
  double sync_frac[2];  // full mode with a grid barrier per row block: producer waits too / runs ahead
};

static bool g_cpu = false;  // --cpu: emulate on the host only

// MIMO_PROBE_ONLY=name,name: run only those kinds (the rest report nothing).
static bool wanted(const char* name) {
  const char* only = getenv("MIMO_PROBE_ONLY");
  if (!only || !*only) return true;
  const size_t n = strlen(name);
  for (const char* p = only; (p = strstr(p, name)) != nullptr; p += n)
    if ((p == only || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return true;
  return false;
}

template <int KIND, int NWG>
static Result run(const char* name, double cbw, int nsm, FILE* log) {
  if (!wanted(name)) return Result{name, {0, 0, 0}, {0, 0, 0}, {0, 0, 0}, -1, -1, {0, 0}};
  using G = Geo<KIND, NWG>;
  constexpr bool FP4 = G::FP4;
  const int nrb = nsm * (FP4 ? 16 : 8) * 64 / G::RB;  // row blocks: every SM the same count, the same bytes
  const long long R = (long long)nrb * G::RB;
  std::mt19937_64 rng(12345 + (FP4 ? 1 : 0) + NWG);  // the baseline draws the same weights as the MXFP4 wgmma kind
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  // Activations and their E4M3 terms.
  std::vector<float> x(K);
  for (auto& v : x) v = U(rng) * std::exp2(U(rng) * 3.f);
  std::vector<double> res(x.begin(), x.end());
  std::vector<uint8_t> term(NTERM * K);
  float inv_s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < NTERM; j++) {
    double m = 0;
    for (int k = 0; k < K; k++) m = std::max(m, std::fabs(res[k]));
    const double s = m > 0 ? std::exp2(std::floor(std::log2(448.0 / m))) : 1.0;
    inv_s[j] = (float)(1.0 / s);
    for (int k = 0; k < K; k++) {
      const uint8_t b = e4m3_of((float)(res[k] * s));
      term[j * K + k] = b;
      res[k] -= (double)e4m3_val(b) / s;
    }
  }
  double xmax = 0, rmax = 0;
  for (int k = 0; k < K; k++) {
    xmax = std::max(xmax, (double)std::fabs(x[k]));
    rmax = std::max(rmax, std::fabs(res[k]));
  }
  // Activation tile [K / 128][8][128 B] with the 128-byte swizzle (16-byte unit u of row n at u ^ n).
  std::vector<uint8_t> bt(G::BT, 0);
  if (!G::F16B) {
    for (int k = 0; k < K; k++)
      for (int j = 0; j < NTERM; j++) {
        const int blk = k / 128, c = k % 128;
        bt[blk * 1024 + j * 128 + (((c >> 4) ^ j) << 4) + (c & 15)] = term[j * K + k];
      }
  } else {
    // Baseline: [K step][column][thread t][4 f16x2]: x at 4t, 4t+1 | 4t+2, 4t+3 | 16+4t, +1 | +2, +3 of the step;
    // column 0 the f16 of x, column 1 the f16 of what it leaves.
    for (int j = 0; j < 8; j++) inv_s[j] = j < 2 ? 1.f : 0.f;
    for (int ks = 0; ks < K / 32; ks++)
      for (int t = 0; t < 4; t++) {
        const int ks4[8] = {4 * t, 4 * t + 1, 4 * t + 2, 4 * t + 3, 16 + 4 * t, 17 + 4 * t, 18 + 4 * t, 19 + 4 * t};
        for (int col = 0; col < 2; col++)
          for (int e = 0; e < 8; e++) {
            const float v = x[ks * 32 + ks4[e]];
            const __half hi = __float2half_rn(v);
            const __half h = col == 0 ? hi : __float2half_rn(v - __half2float(hi));
            memcpy(&bt[((ks * 8 + col) * 4 + t) * 16 + e * 2], &h, 2);
          }
      }
  }
  // Weights and the reference.
  std::vector<uint8_t> wt((size_t)nrb * G::KS * G::CB, 0);
  std::vector<float> f8s(FP4 ? 1 : (size_t)R * (K / 128));
  std::vector<double> ref(R);
  int src[64];
  fp4_layout(src);
  // The baseline's word: element e of fp4_f16's pair e % 4, half e / 4, takes the code of column ordf[e] of the
  // thread's 8 (4t..4t+3, 16+4t..16+4t+3); srch[p] = the word bit fp4_f16 puts at pair bit p (pair p / 32).
  const int ordf[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  int srch[128];
  for (int p = 0; p < 128; p++) srch[p] = -1;
  for (int xb = 0; xb < 32; xb++) {
    unsigned pp[4];
    fp4_f16(1u << xb, pp);
    for (int q = 0; q < 4; q++)
      for (int b = 0; b < 32; b++)
        if (pp[q] >> b & 1) srch[q * 32 + b] = xb;
  }
  std::vector<float> wrow(K);
  for (long long r = 0; r < R; r++) {
    const int rb = (int)(r / G::RB), rr = (int)(r % G::RB);
    if (!FP4) {
      for (int kb = 0; kb < K / 128; kb++) f8s[r * (K / 128) + kb] = std::exp2((float)(int)(rng() % 9) - 4.f) * (0.5f + 0.5f * (U(rng) + 1.f) / 2.f);
      for (int k = 0; k < K; k++) {
        uint8_t b;
        do b = (uint8_t)rng(); while ((b & 0x7F) == 0x7F);
        wrow[k] = e4m3_val(b) * f8s[r * (K / 128) + k / 128];
        const int s = k / G::KCE, c = k % G::KCE, q = c / 128, cc = c % 128;
        const size_t off = ((size_t)rb * G::KS + s) * G::CB + (size_t)(q * G::RB + rr) * 128 +
                           ((((cc >> 4) ^ (rr & 7)) << 4) | (cc & 15));
        wt[off] = b;
      }
    } else {
      for (int s = 0; s < G::KS; s++) {
        uint8_t* ch = wt.data() + ((size_t)rb * G::KS + s) * G::CB;
        for (int st = 0; st < G::KCE / 32; st++) {
          const int e8 = 119 + (int)(rng() % 12);  // block scale 2^(e8 - 127)
          ch[WB + st * G::RB + rr] = (uint8_t)e8;
          const double sc = std::exp2(e8 - 127);
          uint8_t code[32];
          for (int i = 0; i < 32; i++) {
            code[i] = (uint8_t)(rng() & 15);
            if (code[i] == 8) code[i] = 0;  // -0 -> +0 (same value)
            const int k = s * G::KCE + st * 32 + i;
            wrow[k] = (float)((code[i] & 8 ? -1.0 : 1.0) * FP4V[code[i] & 7] * sc);
          }
          // Thread t's word: lo bytes = columns 4t..4t+3, hi bytes = 16+4t..16+4t+3; byte bits (1,2,3,7) = (m,e0,e1,s).
          for (int t = 0; t < 4; t++) {
            unsigned wv = 0;
            if (G::F16B) {
              for (int e = 0; e < 8; e++) {
                const int o = ordf[e];
                const uint8_t c = code[(o < 4 ? 4 * t + o : 16 + 4 * t + o - 4)];
                const int q = e % 4, hf = e / 4;
                const int bits[4] = {9, 10, 11, 15};
                for (int b = 0; b < 4; b++)
                  if (c >> b & 1) wv |= 1u << srch[q * 32 + 16 * hf + bits[b]];
              }
            } else {
              for (int half = 0; half < 2; half++)
                for (int i = 0; i < 4; i++) {
                  const uint8_t c = code[half * 16 + 4 * t + i];
                  const int bits[4] = {8 * i + 1, 8 * i + 2, 8 * i + 3, 8 * i + 7};
                  for (int q = 0; q < 4; q++)
                    if (c >> q & 1) wv |= 1u << src[half * 32 + bits[q]];
                }
            }
            memcpy(ch + G::word_off(st, rr, t), &wv, 4);
          }
        }
      }
    }
    double a = 0;
    for (int k = 0; k < K; k++) a += (double)wrow[k] * x[k];
    ref[r] = a;
  }
  if (g_cpu) {
    // --cpu: the consumers' arithmetic emulated on the host from the same buffers, for the first two row blocks
    // (checks the host layouts and decodes without a GPU; the fragment layouts are the kernel's assumptions).
    double rm = 0, worst = 0;
    for (long long r = 0; r < R; r++) rm = std::max(rm, std::fabs(ref[r]));
    for (long long r = 0; r < 2 * G::RB; r++) {
      const int rb = (int)(r / G::RB), rr = (int)(r % G::RB);
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      auto bterm = [&](int j, int k) {  // E4M3 term j of column k in the swizzled tile
        const int blk = k / 128, c = k % 128;
        return (double)e4m3_val(bt[blk * 1024 + j * 128 + (((c >> 4) ^ j) << 4) + (c & 15)]);
      };
      for (int s = 0; s < G::KS; s++) {
        const uint8_t* ch = wt.data() + ((size_t)rb * G::KS + s) * G::CB;
        if (!FP4) {
          for (int c = 0; c < G::KCE; c++) {
            const int k = s * G::KCE + c, q = c / 128, cc = c % 128;
            const double wv = e4m3_val(ch[(q * G::RB + rr) * 128 + ((((cc >> 4) ^ (rr & 7)) << 4) | (cc & 15))]) *
                              f8s[r * (K / 128) + k / 128];
            for (int j = 0; j < NTERM; j++) acc[j] += wv * bterm(j, k);
          }
        }
        for (int st = 0; FP4 && st < G::KCE / 32; st++) {
          const int k0 = s * G::KCE + st * 32;
          const double sc = std::exp2((int)ch[WB + st * G::RB + rr] - 127);
          for (int t = 0; t < 4; t++) {
            unsigned wv;
            memcpy(&wv, ch + G::word_off(st, rr, t), 4);
            const int ks4[8] = {4 * t, 4 * t + 1, 4 * t + 2, 4 * t + 3, 16 + 4 * t, 17 + 4 * t, 18 + 4 * t, 19 + 4 * t};
            if (KIND == KFP4) {
              unsigned lo, hi;
              fp4_fp8(wv, lo, hi);
              for (int i = 0; i < 8; i++) {
                const double v = e5m2_val((uint8_t)((i < 4 ? lo : hi) >> (8 * (i % 4)))) * 16384.0 * sc;
                for (int j = 0; j < NTERM; j++) acc[j] += v * bterm(j, k0 + ks4[i]);
              }
            } else {
              unsigned pp[4];
              fp4_f16(wv, pp);
              for (int q = 0; q < 4; q++)
                for (int hf = 0; hf < 2; hf++) {
                  __half_raw hr;
                  hr.x = (unsigned short)(pp[q] >> (16 * hf));
                  const double v = (double)__half2float(__half(hr)) * 16384.0 * sc;
                  const int e = 2 * q + hf;  // pair q holds (ks4[2q], ks4[2q + 1])
                  for (int col = 0; col < 2; col++) {
                    __half h;
                    memcpy(&h, &bt[((k0 / 32 * 8 + col) * 4 + t) * 16 + e * 2], 2);
                    acc[col] += v * (double)__half2float(h);
                  }
                }
            }
          }
        }
      }
      double yv = 0;
      for (int j = 0; j < 8; j++) yv += acc[j] * inv_s[j];
      worst = std::max(worst, std::fabs(yv - ref[r]) / rm);
    }
    fprintf(log, "%-16s cpu emulation of the first %d rows: max error %.2e of max|y|\n", name, 2 * G::RB, worst);
    return Result{name, {0, 0, 0}, {0, 0, 0}, {0, 0, 0}, worst, 0, {0, 0}};
  }
  uint8_t *dw, *dbt;
  float *df8, *dinv, *dy;
  CK(cudaMalloc(&dw, wt.size()));
  CK(cudaMalloc(&dbt, bt.size()));
  CK(cudaMalloc(&df8, f8s.size() * 4));
  CK(cudaMalloc(&dinv, 32));
  CK(cudaMalloc(&dy, R * 4));
  unsigned* dcnt;
  CK(cudaMalloc(&dcnt, 4096));
  CK(cudaMemset(dcnt, 0, 4096));
  CK(cudaMemcpy(dw, wt.data(), wt.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbt, bt.data(), bt.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(df8, f8s.data(), f8s.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dinv, inv_s, 32, cudaMemcpyHostToDevice));
  CK(cudaMemset(dy, 0, R * 4));
  auto kern = probe<KIND, NWG>;
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, G::SMEM));
  const double bytes = (double)wt.size() + (FP4 ? 0.0 : (double)f8s.size() * 4);
  Result out{};
  out.name = name;
  auto launch = [&](int mode, int sync) {
    kern<<<nsm, G::CW * 32 + 32, G::SMEM>>>(dw, df8, dbt, dinv, nrb, dy, mode, sync, dcnt);
  };
  for (int mode = 0; mode < 3; mode++) {
    out.ms[mode] = median_ms(3, 20, [] {}, [&] { launch(mode, 0); });
    out.gbs[mode] = bytes / (out.ms[mode] * 1e-3) / 1e9;
    out.frac[mode] = out.gbs[mode] / cbw;
  }
  for (int sync = 1; sync <= 2; sync++) {
    const float ms = median_ms(3, 20, [&] { CK(cudaMemset(dcnt, 0, 4096)); }, [&] { launch(FULL, sync); });
    out.sync_frac[sync - 1] = bytes / (ms * 1e-3) / 1e9 / cbw;
  }
  // Check the full mode's result (the last full-mode launch wrote y).
  CK(cudaMemset(dy, 0, R * 4));
  launch(FULL, 0);
  CK(cudaDeviceSynchronize());
  std::vector<float> yv(R);
  CK(cudaMemcpy(yv.data(), dy, R * 4, cudaMemcpyDeviceToHost));
  double rm = 0, num = 0, den = 0, worst = 0;
  for (long long r = 0; r < R; r++) rm = std::max(rm, std::fabs(ref[r]));
  for (long long r = 0; r < R; r++) {
    const double e = std::fabs(yv[r] - ref[r]);
    worst = std::max(worst, e / rm);
    num += e * e;
    den += ref[r] * ref[r];
  }
  out.max_rel = worst;
  out.rms_rel = std::sqrt(num / den);
  fprintf(log,
          "%-8s rows %lld x %d, %.1f MB: full %.3f ms %.0f GB/s (%.1f %% of copy) | consumers alone %.3f ms (%.1f %%) | "
          "ring alone %.3f ms (%.1f %%) | error vs f64: max %.2e of max|y|, rms %.2e (activation terms' residual "
          "%.1e of max|x|)\n"
          "%-16s with a grid barrier after each of the %d row blocks a block streams (%.0f KB each): %.1f %% of copy "
          "when the producer waits at it too, %.1f %% when it runs ahead\n",
          name, R, K, bytes / 1e6, out.ms[0], out.gbs[0], 100 * out.frac[0], out.ms[1], 100 * out.frac[1], out.ms[2],
          100 * out.frac[2], out.max_rel, out.rms_rel, rmax / xmax, "", nrb / nsm, bytes / nrb / 1e3,
          100 * out.sync_frac[0], 100 * out.sync_frac[1]);
  fflush(log);
  CK(cudaFree(dw));
  CK(cudaFree(dbt));
  CK(cudaFree(df8));
  CK(cudaFree(dinv));
  CK(cudaFree(dy));
  CK(cudaFree(dcnt));
  return out;
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "--cpu") == 0) {
    g_cpu = true;
    run<KFP4MS, 1>("fp4_mma_sync_w4", 1, 2, stdout);
    run<KFP4KS, 1>("fp4_ksplit_v22", 1, 2, stdout);
    run<KFP4, 1>("fp4_wg1", 1, 2, stdout);
    run<KFP4, 2>("fp4_wg2", 1, 2, stdout);
    run<KF8, 1>("f8_wg1", 1, 2, stdout);
    run<KF8P, 2>("f8_wg2_k32", 1, 2, stdout);
    return 0;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const double cbw = copy_bw(1ull << 30);
  printf("device %s (%d SMs), device-to-device copy %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount,
         cbw);
  std::vector<Result> rs;
  rs.push_back(run<KFP4KS, 1>("fp4_ksplit_v22", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KFP4MS, 1>("fp4_mma_sync_w4", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KFP4MS, 2>("fp4_mma_sync_w8", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KFP4, 1>("fp4_wg1", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KFP4, 2>("fp4_wg2", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KF8, 1>("f8_wg1", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KF8, 2>("f8_wg2", cbw, prop.multiProcessorCount, stdout));
  rs.push_back(run<KF8P, 2>("f8_wg2_k32", cbw, prop.multiProcessorCount, stdout));
  if (argc > 1) {
    FILE* f = fopen(argv[1], "w");
    if (!f) {
      perror(argv[1]);
      return 1;
    }
    fprintf(f, "{\"device\": \"%s\", \"sms\": %d, \"copy_gbs\": %.1f, \"k\": %d, \"runs\": [", prop.name,
            prop.multiProcessorCount, cbw, K);
    bool first = true;
    for (size_t i = 0; i < rs.size(); i++) {
      const Result& r = rs[i];
      if (r.max_rel < 0) continue;
      fprintf(f,
              "%s{\"name\": \"%s\", \"full_ms\": %.4f, \"full_frac\": %.4f, \"nocopy_ms\": %.4f, \"nocopy_frac\": %.4f, "
              "\"nocompute_ms\": %.4f, \"nocompute_frac\": %.4f, \"max_rel\": %.3e, \"rms_rel\": %.3e, "
              "\"barrier_producer_waits_frac\": %.4f, \"barrier_producer_ahead_frac\": %.4f}",
              first ? "" : ", ", r.name, r.ms[0], r.frac[0], r.ms[1], r.frac[1], r.ms[2], r.frac[2], r.max_rel, r.rms_rel,
              r.sync_frac[0], r.sync_frac[1]);
      first = false;
    }
    fprintf(f, "]}\n");
    fclose(f);
  }
  return 0;
}
