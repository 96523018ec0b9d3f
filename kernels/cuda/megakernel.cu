// mimo persistent megakernel: one launch runs a whole forward (decode step or verify block).
//
// Grid = one block per SM (cooperative launch, so every block is resident). Every block walks the same
// instruction stream; instruction i is split into `ntiles` tiles and block b runs tiles
// (b - rot_i) mod G, (b - rot_i) mod G + G, ... (rot_i assigned at compile time to balance bytes across blocks).
// Dependencies are per-instruction completion counters in global memory: after its tiles of instruction i a
// block does a release-increment of done[i]; before instruction j a block acquire-waits until done[d] reaches
// epoch * G for every producer d of j. No kernel boundary inside a forward.
//
// Warp roles inside a block: warp 0 lane 0 fetches the next instruction descriptor into shared memory and spins on
// the dependency counters (the control role); all warps then stream weight rows with 16-byte non-coherent loads,
// several in flight per lane, dequantizing MXFP4 / FP8 / bf16 in registers (the data roles).
//
// The generated file that includes this body defines MK_THREADS, MK_MAX_T, MK_TILE_MAX, MK_XS (floats of the
// shared activation buffer) and MK_STAGE (floats of the tile-output stage); see compiler/src/codegen.rs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#ifndef MK_THREADS
#define MK_THREADS 256
#endif
#ifndef MK_MAX_T
#define MK_MAX_T 16
#endif
#ifndef MK_TILE_MAX
#define MK_TILE_MAX 128
#endif
#ifndef MK_XS
#define MK_XS 16384
#endif
#ifndef MK_STAGE
#define MK_STAGE 6144
#endif
#define MK_WARPS (MK_THREADS / 32)

enum Op {
  OP_EMBED = 0, OP_RMSNORM = 1, OP_MATMUL = 2, OP_ROPE = 3, OP_KVWRITE = 4, OP_ATTN = 5, OP_ROUTER = 6,
  OP_MOE_UP = 7, OP_MOE_DOWN = 8, OP_SWIGLU = 9, OP_SCALE = 10, OP_ADD = 11, OP_ARGMAX = 12
};
enum Fmt { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_F8 = 3, FMT_MXFP4 = 4 };
// Epilogue stage codes (up to 6 stages, 4 bits each, in order).
enum Epi { EPI_NONE = 0, EPI_SCALE = 1, EPI_ROPE = 2, EPI_KVWRITE = 3, EPI_SWIGLU = 4, EPI_RESIDUAL = 5 };

// Must match kernels/src/device.rs `DInstr` (256 bytes).
struct DInstr {
  int op, ntiles, tile_rows, ndeps;
  int deps[8];
  long long w, ws, w2, ws2;
  long long bias, normw, sinks, aux;
  int x, xw, out, outw;
  int res, resw, fmt, n;
  int k, epi, nepi, rot;
  int heads, hd, rotary, layer;
  int kv_k, kv_v, kv_cap, kvkind;
  int nh, nkv, qd, vd;
  int window, E, topk, ngroup;
  int topkg, normtopk, sigmoid, inter;
  float eps, scale, theta, rscale;
};
static_assert(sizeof(DInstr) == 256, "DInstr layout");

struct Params {
  const DInstr* instrs;
  int ninstr;
  const uint8_t* weights;
  float* arena;
  float* kv;
  float* scratch;
  const int* tokens;
  const int* pos;
  int* out_tokens;
  unsigned int* done;
  unsigned int epoch;
  int T;
  float temperature;
  unsigned long long seed;
  unsigned long long* prof;  // optional: per (instruction, block) wait-start / work-start / end times (ns)
};

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

__device__ __forceinline__ unsigned int ld_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release(unsigned int* p, unsigned int v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Activations written by other blocks in this launch: read through L2, never a stale L1 line.
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }

__device__ __forceinline__ uint4 ldg16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float bf16lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

__constant__ float c_e2m1[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                 -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

__device__ __forceinline__ float e4m3_to_f32(unsigned int b) {
  unsigned int s = (b & 0x80u) << 24;
  unsigned int e = (b >> 3) & 0xFu;
  unsigned int m = b & 7u;
  float v;
  if (e == 0) {
    v = (float)m * 0.001953125f;  // m * 2^-9
  } else if (e == 15 && m == 7) {
    v = __int_as_float(0x7fc00000);
  } else {
    v = __uint_as_float(((e + 120u) << 23) | (m << 20));
  }
  return __uint_as_float(__float_as_uint(v) | s);
}

__device__ __forceinline__ float e8m0_to_f32(unsigned int b) {
  return b == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(b << 23);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// v4 GEMV core. A warp computes NR weight rows at once (NR x U = 8 16-byte loads in flight per lane, issued before
// any arithmetic); the activations of a piece are read from shared memory once for all NR rows. MXFP4 decodes through a 16-entry
// shared table (one bank per entry), FP8 through the hardware e4m3x2 -> f16x2 conversion, bf16 by a shift.
//
// Which weight row, activation rows and output slots a tile-local row uses is described by TileRows:
//   mode 0 (dense):     weight row map(rr); x rows j < T at xs[j * xstride]; output stage[j * sstride + rr].
//   mode 1 (MoE up):    as mode 0 inside one expert, with n = that expert's member count (x rows packed).
//   mode 2 (MoE down):  rows rr = u * cols + c span every routed expert u; x rows are the expert's (token, slot)
//                       pairs p at xs[p * xstride]; output stage[p * sstride + c].
//   mode 3 (MoE up, batched): as mode 1 over several column tiles of one expert, tile j at columns
//                       c0 + j * jstride (gate rows then up rows of each tile).

struct TileRows {
  int mode;
  int c0, cols, split;  // map(rr) = rr < cols ? c0 + rr : split + c0 + rr - cols
  int jstride;          // mode 3: column stride between the batched tiles
  int xpack;            // mode 2: >= 0 when xs holds only this call's member rows, packed from list index xpack
  long long w, ws;      // weight / scale base (modes 0, 1); mode 2: expert 0 of [E, erows, K]
  int erows, K, n;      // rows per expert (mode 2); row length; x rows (modes 0, 1)
  int xstride, sstride;
  const int* ids;       // mode 2: routed expert ids, member counts, member starts, member pair lists
  const int* cnt;
  const int* mst;
  const int* ml;
  // Activation row of member t of a mode-2 list starting at xl (packed or indexed by pair id).
  __device__ __forceinline__ int xrow(int xl, int t) const { return xpack >= 0 ? xl + t - xpack : ml[xl + t]; }
  __device__ __forceinline__ int map(int rr) const {
    if (mode == 3) {
      const int j = rr / (2 * cols), r = rr - j * 2 * cols;
      const int c = c0 + j * jstride + (r < cols ? r : r - cols);
      return r < cols ? c : split + c;
    }
    return rr < cols ? c0 + rr : split + c0 + (rr - cols);
  }
  // Mode 3 rows past the last column (a partial final tile) do nothing.
  __device__ __forceinline__ bool valid(int rr) const {
    if (mode != 3) return true;
    const int j = rr / (2 * cols), r = rr - j * 2 * cols;
    return c0 + j * jstride + (r < cols ? r : r - cols) < split;
  }
};
__shared__ TileRows mk_tile;  // the tile being streamed (written by thread 0 in rows_dot)


template <int FMT> struct Piece;  // elements per 16-byte piece
template <> struct Piece<FMT_BF16> { static constexpr int E = 8; };
template <> struct Piece<FMT_F8> { static constexpr int E = 16; };
template <> struct Piece<FMT_MXFP4> { static constexpr int E = 32; };

// Row start (weights) and scale-row start for row `row` of a [rows, K] matrix at byte offsets w / ws.
template <int FMT>
__device__ __forceinline__ const uint8_t* row_ptr(const uint8_t* W, long long w, int row, int K) {
  if (FMT == FMT_BF16) return W + w + (long long)row * K * 2;
  if (FMT == FMT_F8) return W + w + (long long)row * K;
  return W + w + (long long)row * (K / 2);
}
template <int FMT>
__device__ __forceinline__ const uint8_t* srow_ptr(const uint8_t* W, long long ws, int row, int K) {
  if (FMT == FMT_F8) return W + ws + (long long)(row / 128) * ((K + 127) / 128) * 4;
  if (FMT == FMT_MXFP4) return W + ws + (long long)row * (K / 32);
  return W;
}
template <int FMT>
__device__ __forceinline__ const uint8_t* piece_at(const uint8_t* rp, int k) {
  if (FMT == FMT_BF16) return rp + (long long)k * 2;
  if (FMT == FMT_F8) return rp + k;
  return rp + k / 2;
}
template <int FMT>
__device__ __forceinline__ float scale_at(const uint8_t* sp, int k) {
  if (FMT == FMT_F8) return __ldg(reinterpret_cast<const float*>(sp) + k / 128);
  if (FMT == FMT_MXFP4) return e8m0_to_f32(__ldg(sp + k / 32));
  return 1.f;
}

// Byte offsets of expert e of a 3-D [E, rows, K] weight.
__device__ __forceinline__ void expert_offsets(int fmt, long long w, long long ws, int e, int rows, int K,
                                               long long* we, long long* wse) {
  long long n = (long long)rows * K;
  switch (fmt) {
    case FMT_BF16: case FMT_F16: *we = w + (long long)e * n * 2; *wse = ws; break;
    case FMT_F32: *we = w + (long long)e * n * 4; *wse = ws; break;
    case FMT_F8: *we = w + (long long)e * n; *wse = ws + (long long)e * ((rows + 127) / 128) * ((K + 127) / 128) * 4; break;
    default: *we = w + (long long)e * n / 2; *wse = ws + (long long)e * n / 32; break;
  }
}

// Decode 4 weights of piece word group q.
template <int FMT>
__device__ __forceinline__ void decode4(const unsigned int* words, int q, float sc, const float* lut, float* w4) {
  if (FMT == FMT_BF16) {
    unsigned int w0 = words[(4 * q) / 2], w1 = words[(4 * q) / 2 + 1];
    w4[0] = bf16lo(w0); w4[1] = bf16hi(w0); w4[2] = bf16lo(w1); w4[3] = bf16hi(w1);
  } else if (FMT == FMT_F8) {
    unsigned int wd = words[q];
    __half2_raw h0 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wd & 0xffffu), __NV_E4M3);
    __half2_raw h1 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wd >> 16), __NV_E4M3);
    float2 f0 = __half22float2(*reinterpret_cast<__half2*>(&h0));
    float2 f1 = __half22float2(*reinterpret_cast<__half2*>(&h1));
    w4[0] = f0.x * sc; w4[1] = f0.y * sc; w4[2] = f1.x * sc; w4[3] = f1.y * sc;
  } else {
    unsigned int wd = words[q >> 1] >> ((q & 1) * 16);
    w4[0] = lut[wd & 0xfu]; w4[1] = lut[(wd >> 4) & 0xfu]; w4[2] = lut[(wd >> 8) & 0xfu]; w4[3] = lut[(wd >> 12) & 0xfu];
  }
}

// acc[i][t] += dot(row i piece, x[t]) for the NR rows of a group sharing activation rows xo[t] (t < n); the x
// values of a piece are read from shared memory once and reused by all NR rows.
template <int FMT, int NR, int TM>
__device__ __forceinline__ void group_fma(const uint4 (&v)[NR], const float (&sc)[NR], const bool (&ok)[NR],
                                          const float* xs, const int (&xo)[TM], int n, int k, float (&acc)[NR][TM],
                                          const float* lut) {
  constexpr int PE = Piece<FMT>::E;
  float part[NR][TM];
#pragma unroll
  for (int i = 0; i < NR; i++)
#pragma unroll
    for (int t = 0; t < TM; t++) part[i][t] = 0.f;
#pragma unroll
  for (int q = 0; q < PE / 4; q++) {
    float4 xv[TM];
#pragma unroll
    for (int t = 0; t < TM; t++)
      if (t < n) xv[t] = *reinterpret_cast<const float4*>(xs + xo[t] + k + 4 * q);
#pragma unroll
    for (int i = 0; i < NR; i++) {
      if (!ok[i]) continue;
      const unsigned int words[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
      float w4[4];
      decode4<FMT>(words, q, sc[i], lut, w4);
#pragma unroll
      for (int t = 0; t < TM; t++)
        if (t < n) part[i][t] += w4[0] * xv[t].x + w4[1] * xv[t].y + w4[2] * xv[t].z + w4[3] * xv[t].w;
    }
  }
#pragma unroll
  for (int i = 0; i < NR; i++)
#pragma unroll
    for (int t = 0; t < TM; t++) acc[i][t] += (FMT == FMT_MXFP4) ? part[i][t] * sc[i] : part[i][t];
}

// stage[out(rr, j)] += dot(W[row(rr)], x[j]) for rr in [0, nrows), over k in [k0, k0 + kc). A warp takes groups of
// NR consecutive rows (same expert, same activation rows); each step keeps NR x U 16-byte loads per lane in
// flight before any arithmetic (8 for one token, fewer as the per-piece arithmetic grows with the tokens).
template <int FMT, int NR, int TM, int U>
__device__ __noinline__ void warp_rows(const uint8_t* W, const TileRows& dref, int k0, int kc, const float* xs,
                                       int nrows, float* stage, const float* lut) {
  constexpr int PE = Piece<FMT>::E;
  constexpr int STEP = 32 * PE * U;
  const TileRows d = dref;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int colsp = (d.cols + 3) & ~3;  // mode 2: rows per expert, padded so groups never straddle experts
  for (int g = warp; g * NR < nrows; g += MK_WARPS) {
    const uint8_t* rp[NR];
    const uint8_t* sp[NR];
    bool ok[NR];
    int n, xl, col0;
    if (d.mode == 2) {
      const int u = (g * NR) / colsp;
      col0 = g * NR - u * colsp;
      long long we, wse;
      expert_offsets(FMT, d.w, d.ws, d.ids[u], d.erows, d.K, &we, &wse);
      n = d.cnt[u];
      xl = d.mst[u];
#pragma unroll
      for (int i = 0; i < NR; i++) {
        ok[i] = col0 + i < d.cols;
        rp[i] = row_ptr<FMT>(W, we, d.c0 + col0 + i, d.K);
        sp[i] = srow_ptr<FMT>(W, wse, d.c0 + col0 + i, d.K);
      }
    } else {
      col0 = g * NR;
      n = d.n;
      xl = -1;
#pragma unroll
      for (int i = 0; i < NR; i++) {
        ok[i] = col0 + i < nrows && d.valid(col0 + i);
        int row = d.map(ok[i] ? col0 + i : col0);
        rp[i] = row_ptr<FMT>(W, d.w, row, d.K);
        sp[i] = srow_ptr<FMT>(W, d.ws, row, d.K);
      }
    }
    int xo[TM];
#pragma unroll
    for (int t = 0; t < TM; t++) xo[t] = t < n ? (xl >= 0 ? d.xrow(xl, t) : t) * d.xstride : 0;
    float acc[NR][TM];
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
      for (int t = 0; t < TM; t++) acc[i][t] = 0.f;
    for (int kb = 0; kb < kc; kb += STEP) {
      uint4 v[U][NR];
      float sc[U][NR];
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
#pragma unroll
        for (int i = 0; i < NR; i++)
          if (kk < kc && ok[i]) v[u][i] = ldg16(piece_at<FMT>(rp[i], k0 + kk));
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
#pragma unroll
        for (int i = 0; i < NR; i++) sc[u][i] = (kk < kc && ok[i]) ? scale_at<FMT>(sp[i], k0 + kk) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
        if (kk < kc) group_fma<FMT, NR, TM>(v[u], sc[u], ok, xs, xo, n, kk, acc, lut);
      }
    }
#pragma unroll
    for (int i = 0; i < NR; i++) {
#pragma unroll
      for (int t = 0; t < TM; t++) {
        if (t < n) {
          float r = warp_sum(acc[i][t]);
          if (lane == 0 && ok[i]) {
            int orow = xl >= 0 ? d.ml[xl + t] : t;
            stage[orow * d.sstride + col0 + i] += r;
          }
        }
      }
    }
  }
}

// Scalar fallback for f32 / f16 weights (small tensors only).
__device__ __noinline__ void warp_rows_scalar(int fmt, const uint8_t* W, const TileRows& d, int k0, int kc, const float* xs,
                                 int nrows, float* stage) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int rr = warp; rr < nrows; rr += MK_WARPS) {
    long long wb;
    int row, n, xl, col;
    if (d.mode == 2) {
      const int colsp = (d.cols + 3) & ~3;
      int u = rr / colsp;
      col = rr - u * colsp;
      if (col >= d.cols) continue;
      long long we, wse;
      expert_offsets(fmt, d.w, d.ws, d.ids[u], d.erows, d.K, &we, &wse);
      wb = we; row = d.c0 + col; n = d.cnt[u]; xl = d.mst[u];
    } else {
      if (!d.valid(rr)) continue;
      wb = d.w; row = d.map(rr); n = d.n; xl = -1; col = rr;
    }
    for (int t = 0; t < n; t++) {
      int xr = xl >= 0 ? d.xrow(xl, t) : t;
      int orow = xl >= 0 ? d.ml[xl + t] : t;
      float a = 0.f;
      for (int kk = lane; kk < kc; kk += 32) {
        long long idx = (long long)row * d.K + k0 + kk;
        float wv = fmt == FMT_F32 ? __ldg(reinterpret_cast<const float*>(W + wb) + idx)
                                  : __half2float(reinterpret_cast<const __half*>(W + wb)[idx]);
        a += wv * xs[xr * d.xstride + kk];
      }
      a = warp_sum(a);
      if (lane == 0) stage[orow * d.sstride + col] += a;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// v5 GEMV core: warp-specialized. Warp MK_CW (the producer) streams weight row segments HBM -> shared memory with
// the bulk-copy engine (cp.async.bulk, completion counted in bytes on an mbarrier) into a RING_NS-slot ring;
// warps 0..MK_CW-1 (consumers) wait on a slot's "full" barrier, dequantize in registers, and release the slot on
// its "empty" barrier. A slot holds one chunk: RING_ROWS rows x one RING_SEG-byte segment along K (and, for MXFP4
// rows whose scales are 16-byte aligned, the segment's scale bytes, so no load is left on the consumers' critical
// path). Consumer warp w
// owns 4 rows of each chunk (they share activation reads) and accumulates across the row's segments.
// Both sides walk the same chunk sequence and keep the same running chunk counter, which gives slot and phase.

#define MK_CW 7

__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define RING_NS 3
#define RING_ROWS 28
#define RING_SEG 1024
#define RING_SCALES (RING_SEG / 16)  // MXFP4 scale bytes of one row segment
#define RING_SLOT (RING_ROWS * (RING_SEG + RING_SCALES))

extern __shared__ __align__(128) float mk_smem[];            // dynamic: [ring | xs | stage | red | inv | iv]
__shared__ __align__(8) unsigned long long mk_bars[2 * RING_NS];  // full[RING_NS], empty[RING_NS]
__shared__ int mk_meta[RING_NS];                              // row stride of the chunk in each slot
__shared__ unsigned long long mk_stat[5];                     // ring profile counters (see ring_rows)
__shared__ int mk_prof_on;
__shared__ __align__(64) float mk_lut[16];                    // E2M1 values (64-byte aligned: lut | idx)
__shared__ int mk_flags[4];                                   // [0]: the instruction's activations are in xs

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, unsigned int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned int parity) {
  asm volatile(
      "{\n .reg .pred P1;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      " @!P1 bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}



__device__ __forceinline__ unsigned int sel_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Elements <-> bytes of a weight format.
template <int FMT> __device__ __forceinline__ int el_bytes(int el) {
  return FMT == FMT_BF16 ? el * 2 : FMT == FMT_F8 ? el : el / 2;
}

// Resolve ring row r of the call: weight row pointer, scale row pointer, activation rows (mode 2: the row's
// expert members) and output column. ok is false for rows past nrows or padding.
struct RowInfo {
  const uint8_t* rp;
  const uint8_t* sp;
  int n, xl, col;
  bool ok;
};

template <int FMT>
__device__ __forceinline__ RowInfo ring_row(const uint8_t* W, const TileRows& d, int r, int nrows) {
  RowInfo o;
  o.rp = W; o.sp = W; o.n = 0; o.xl = -1; o.col = 0; o.ok = false;
  if (r >= nrows) return o;
  if (d.mode == 2) {
    const int colsp = (d.cols + 3) & ~3;
    const int u = r / colsp, c = r - u * colsp;
    if (c >= d.cols) return o;
    long long we, wse;
    expert_offsets(FMT, d.w, d.ws, d.ids[u], d.erows, d.K, &we, &wse);
    o.rp = row_ptr<FMT>(W, we, d.c0 + c, d.K);
    o.sp = srow_ptr<FMT>(W, wse, d.c0 + c, d.K);
    o.n = d.cnt[u];
    o.xl = d.mst[u];
    o.col = c;
  } else {
    if (!d.valid(r)) return o;
    const int row = d.map(r);
    o.rp = row_ptr<FMT>(W, d.w, row, d.K);
    o.sp = srow_ptr<FMT>(W, d.ws, row, d.K);
    o.n = d.n;
    o.col = r;
  }
  o.ok = true;
  return o;
}

// Shared-memory loads by 32-bit address (keeps the hot loop free of generic 64-bit address arithmetic). volatile:
// they stay after the mbarrier wait that publishes the slot.
__device__ __forceinline__ unsigned int lds32(unsigned int a) {
  unsigned int v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ unsigned int lds8(unsigned int a) {
  unsigned short v;
  asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ float ldsf(unsigned int a) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ float2 lds2f(unsigned int a) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ float4 lds4f(unsigned int a) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a));
  return v;
}

// stage[out(r, j)] += dot(W[row(r)], x[j]) for r < nrows over k in [k0, k0 + kc), through the ring. Every thread
// of the block calls it; `it` is the block's running chunk counter (the same on every thread).
template <int FMT, int TM>
__device__ __noinline__ void ring_rows(const uint8_t* W, int k0, int kc, const float* xs, int nrows, float* stage,
                                       unsigned int it) {
  constexpr int PE = Piece<FMT>::E;
  const TileRows& d = mk_tile;
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  uint8_t* const rbuf = reinterpret_cast<uint8_t*>(mk_smem);
  unsigned long long* const stat = mk_prof_on ? mk_stat : nullptr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kbytes = el_bytes<FMT>(kc);
  const int seg = min(RING_SEG, kbytes);
  const int nseg = (kbytes + seg - 1) / seg;
  const int segel = seg * PE / 16;  // elements per full segment
  const int ngroups = (nrows + RING_ROWS - 1) / RING_ROWS;
  const int nchunks = ngroups * nseg;
  const int kb0 = el_bytes<FMT>(k0);
  // MXFP4 scales travel with the weights when every copy is 16-byte sized and aligned.
  const bool sring = FMT == FMT_MXFP4 && ((d.K / 32) & 15) == 0 && (d.ws & 15) == 0 && (kbytes & 255) == 0 &&
                     (k0 & 511) == 0 && (reinterpret_cast<uintptr_t>(W) & 15) == 0;
  const long long tstart = clock64();
  const unsigned long long gstart = stat && threadIdx.x == 0 ? gtimer() : 0;
  long long twait = 0;
  if (warp == MK_CW) {
    // Producer: lanes 0..RING_ROWS-1 each copy one row segment of the chunk.
    for (int c = 0; c < nchunks; c++) {
      const int g = c / nseg, sg = c - g * nseg;
      const unsigned int u = it + c;
      const int slot = u % RING_NS;
      if (u >= RING_NS) {
        const long long t0 = clock64();
        mbar_wait(empty + slot, ((u / RING_NS) - 1) & 1);
        twait += clock64() - t0;
      }
      const int bytes = min(seg, kbytes - sg * seg);
      const RowInfo ri = ring_row<FMT>(W, d, g * RING_ROWS + lane, nrows);
      const uint8_t* rp = ri.rp;
      const uint8_t* sp = ri.sp;
      const bool ok = lane < RING_ROWS && ri.ok;
      const unsigned int cnt = __popc(__ballot_sync(0xffffffffu, ok));
      const int sbytes = sring ? bytes / 16 : 0;
      // Whole rows that follow each other in memory go as one copy (and their scales as another).
      const uint8_t* rp0 = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(rp), 0));
      const uint8_t* sp0 = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(sp), 0));
      const bool contig = nseg == 1 &&
                          __all_sync(0xffffffffu, lane >= RING_ROWS || (ok && rp == rp0 + lane * seg &&
                                                                        (!sring || sp == sp0 + lane * (seg / 16))));
      if (lane == 0) {
        mk_meta[slot] = contig ? seg : RING_SEG;  // row stride inside the slot (ordered by the arrive below)
        mbar_arrive_expect(full + slot, cnt * (bytes + sbytes));
      }
      __syncwarp();
      if (contig) {
        if (lane == 0) {
          bulk_g2s(rbuf + slot * RING_SLOT, rp0 + kb0, RING_ROWS * bytes, full + slot);
          if (sring)
            bulk_g2s(rbuf + slot * RING_SLOT + RING_ROWS * RING_SEG, sp0 + k0 / 32, RING_ROWS * sbytes,
                     full + slot);
        }
      } else if (ok) {
        bulk_g2s(rbuf + slot * RING_SLOT + lane * RING_SEG, rp + kb0 + sg * seg, bytes, full + slot);
        if (sring)
          bulk_g2s(rbuf + slot * RING_SLOT + RING_ROWS * RING_SEG + lane * RING_SCALES,
                   sp + (k0 + sg * segel) / 32, sbytes, full + slot);
      }
    }
    if (stat && lane == 0) {
      stat[2] += twait;
      stat[3] += clock64() - tstart;
    }
    return;
  }
  if (warp > MK_CW) return;
  // Consumers: warp w owns rows NRW*w .. NRW*w + NRW - 1 of every chunk.
  constexpr int NRW = RING_ROWS / MK_CW;
  const uint8_t* sp[NRW];
  bool ok[NRW];
  int n = 0, xl = -1, col[NRW];
  unsigned int xa[TM];  // shared-memory byte address of each activation row
  float acc[NRW][TM];
  const unsigned int lutb = smem_u32(mk_lut);
  const unsigned int ringb = smem_u32(rbuf);
  const unsigned int xsb = smem_u32(xs);
  for (int c = 0; c < nchunks; c++) {
    const int g = c / nseg, sg = c - g * nseg;
    const unsigned int u = it + c;
    const int slot = u % RING_NS;
    if (sg == 0) {
      n = 0;
#pragma unroll
      for (int i = 0; i < NRW; i++) {
        const RowInfo ri = ring_row<FMT>(W, d, g * RING_ROWS + NRW * warp + i, nrows);
        ok[i] = ri.ok;
        sp[i] = ri.sp;
        col[i] = ri.col;
        if (ri.ok) { n = ri.n; xl = ri.xl; }
      }
#pragma unroll
      for (int t = 0; t < TM; t++)
        xa[t] = xsb + 4u * (unsigned int)((t < n ? (xl >= 0 ? d.xrow(xl, t) : t) : 0) * d.xstride);
#pragma unroll
      for (int i = 0; i < NRW; i++)
#pragma unroll
        for (int t = 0; t < TM; t++) acc[i][t] = 0.f;
    }
    const int bytes = min(seg, kbytes - sg * seg);
    constexpr int PPL = RING_SEG / 16 / 32;  // pieces per lane per row
    const long long tw0 = clock64();
    mbar_wait(full + slot, (u / RING_NS) & 1);
    twait += clock64() - tw0;
    const int rs = mk_meta[slot];  // row stride of this chunk in the slot
    const unsigned int wb = ringb + slot * RING_SLOT + (NRW * warp) * rs;
    const unsigned int sb = ringb + slot * RING_SLOT + RING_ROWS * RING_SEG + (NRW * warp) * (rs / 16);
    // One piece per row at a time (not unrolled: keeps the accumulators in registers).
#pragma unroll 1
    for (int j = 0; j < PPL; j++) {
      const int pc = lane + 32 * j;
      if (pc * 16 >= bytes) continue;
      float sc[NRW];
#pragma unroll
      for (int i = 0; i < NRW; i++)
        sc[i] = sring ? e8m0_to_f32(lds8(sb + i * (rs / 16) + pc))
                      : (ok[i] ? scale_at<FMT>(sp[i], k0 + sg * segel + pc * PE) : 1.f);
      const unsigned int kx = 4u * (unsigned int)(sg * segel + pc * PE);  // byte offset of the piece in an x row
      float part[NRW][TM];
#pragma unroll
      for (int i = 0; i < NRW; i++)
#pragma unroll
        for (int t = 0; t < TM; t++) part[i][t] = 0.f;
      // The piece's 4 words, visited in a lane-rotated order (activation reads of a phase spread over banks).
#pragma unroll
      for (int w0 = 0; w0 < 4; w0++) {
        const int w = (w0 + lane) & 3;
        unsigned int wd[NRW];
#pragma unroll
        for (int i = 0; i < NRW; i++) wd[i] = lds32(wb + i * rs + pc * 16 + 4 * w);
        if (FMT == FMT_MXFP4) {
          // Word w = elements 8w .. 8w + 7.
#pragma unroll
          for (int h = 0; h < 2; h++) {
            float4 xv[TM];
#pragma unroll
            for (int t = 0; t < TM; t++)
              if (TM == 1 || t < n) xv[t] = lds4f(xa[t] + kx + 32 * w + 16 * h);
#pragma unroll
            for (int i = 0; i < NRW; i++) {
              float wv[4];
#pragma unroll
              for (int e = 0; e < 4; e++) {
                const int sh = 4 * (4 * h + e) - 2;
                const unsigned int idx = (sh >= 0 ? (wd[i] >> sh) : (wd[i] << 2)) & 0x3cu;
                wv[e] = ldsf(lutb | idx);
              }
#pragma unroll
              for (int t = 0; t < TM; t++)
                if (TM == 1 || t < n)
                  part[i][t] += wv[0] * xv[t].x + wv[1] * xv[t].y + wv[2] * xv[t].z + wv[3] * xv[t].w;
            }
          }
        } else if (FMT == FMT_F8) {
          float4 xv[TM];
#pragma unroll
          for (int t = 0; t < TM; t++)
            if (TM == 1 || t < n) xv[t] = lds4f(xa[t] + kx + 16 * w);
#pragma unroll
          for (int i = 0; i < NRW; i++) {
            __half2_raw h0 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wd[i] & 0xffffu), __NV_E4M3);
            __half2_raw h1 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(wd[i] >> 16), __NV_E4M3);
            float2 f0 = __half22float2(*reinterpret_cast<__half2*>(&h0));
            float2 f1 = __half22float2(*reinterpret_cast<__half2*>(&h1));
#pragma unroll
            for (int t = 0; t < TM; t++)
              if (TM == 1 || t < n)
                part[i][t] += f0.x * xv[t].x + f0.y * xv[t].y + f1.x * xv[t].z + f1.y * xv[t].w;
          }
        } else {
          float2 xv[TM];
#pragma unroll
          for (int t = 0; t < TM; t++)
            if (TM == 1 || t < n) xv[t] = lds2f(xa[t] + kx + 8 * w);
#pragma unroll
          for (int i = 0; i < NRW; i++)
#pragma unroll
            for (int t = 0; t < TM; t++)
              if (TM == 1 || t < n) part[i][t] += bf16lo(wd[i]) * xv[t].x + bf16hi(wd[i]) * xv[t].y;
        }
      }
#pragma unroll
      for (int i = 0; i < NRW; i++)
#pragma unroll
        for (int t = 0; t < TM; t++) acc[i][t] += part[i][t] * sc[i];
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + slot);
    if (sg == nseg - 1) {
#pragma unroll
      for (int i = 0; i < NRW; i++) {
#pragma unroll
        for (int t = 0; t < TM; t++) {
          if (t < n) {
            float r = warp_sum(acc[i][t]);
            if (lane == 0 && ok[i]) {
              int orow = xl >= 0 ? d.ml[xl + t] : t;
              stage[orow * d.sstride + col[i]] += r;
            }
          }
        }
      }
    }
  }
  if (stat && threadIdx.x == 0) {
    stat[0] += twait;
    stat[1] += clock64() - tstart;
    stat[4] += gtimer() - gstart;
  }
}

// Chunks a ring_rows call consumes (to advance the running counter).
template <int FMT>
__device__ __forceinline__ unsigned int ring_chunks(int kc, int nrows) {
  const int kbytes = el_bytes<FMT>(kc);
  const int seg = min(RING_SEG, kbytes);
  return (unsigned int)(((nrows + RING_ROWS - 1) / RING_ROWS) * ((kbytes + seg - 1) / seg));
}

template <int FMT>
__device__ __forceinline__ void rows_dispatch_t(const uint8_t* W, const TileRows& d, int k0, int kc, const float* xs,
                                                int nrows, float* stage, const float* lut, int T) {
  if (T <= 1) warp_rows<FMT, 4, 1, 4>(W, d, k0, kc, xs, nrows, stage, lut);
  else if (T <= 4) warp_rows<FMT, 2, 4, 4>(W, d, k0, kc, xs, nrows, stage, lut);
  else if (T <= 8) warp_rows<FMT, 1, 8, 4>(W, d, k0, kc, xs, nrows, stage, lut);
  else warp_rows<FMT, 1, MK_MAX_T, 2>(W, d, k0, kc, xs, nrows, stage, lut);
}

template <int FMT>
__device__ __forceinline__ void ring_dispatch_t(const uint8_t* W, int k0, int kc, const float* xs, int nrows,
                                                float* stage, int T, unsigned int* it) {
  if (T <= 1) ring_rows<FMT, 1>(W, k0, kc, xs, nrows, stage, *it);
  else if (T <= 4) ring_rows<FMT, 4>(W, k0, kc, xs, nrows, stage, *it);
  else if (T <= 8) ring_rows<FMT, 8>(W, k0, kc, xs, nrows, stage, *it);
  else ring_rows<FMT, MK_MAX_T>(W, k0, kc, xs, nrows, stage, *it);
  *it += ring_chunks<FMT>(kc, nrows);
}

// Accumulate a tile's dot products into stage (which the caller zeroes). T bounds the member counts. The tile
// descriptor is published in shared memory first. Weights whose rows are 16-byte aligned stream through the
// bulk-copy ring; others take the register path.
__device__ void rows_dot(int fmt, const uint8_t* W, const TileRows& dl, int k0, int kc, const float* xs, int nrows,
                         float* stage, const float* lut, int T, unsigned int* it) {
  if (threadIdx.x == 0) mk_tile = dl;
  __syncthreads();
  const TileRows& d = mk_tile;
  const bool ring_ok = (d.w & 15) == 0 && (reinterpret_cast<uintptr_t>(W) & 15) == 0;
  switch (fmt) {
    case FMT_BF16:
      if (ring_ok) ring_dispatch_t<FMT_BF16>(W, k0, kc, xs, nrows, stage, T, it);
      else rows_dispatch_t<FMT_BF16>(W, d, k0, kc, xs, nrows, stage, lut, T);
      break;
    case FMT_F8:
      if (ring_ok) ring_dispatch_t<FMT_F8>(W, k0, kc, xs, nrows, stage, T, it);
      else rows_dispatch_t<FMT_F8>(W, d, k0, kc, xs, nrows, stage, lut, T);
      break;
    case FMT_MXFP4:
      if (ring_ok) ring_dispatch_t<FMT_MXFP4>(W, k0, kc, xs, nrows, stage, T, it);
      else rows_dispatch_t<FMT_MXFP4>(W, d, k0, kc, xs, nrows, stage, lut, T);
      break;
    default: warp_rows_scalar(fmt, W, d, k0, kc, xs, nrows, stage); break;
  }
}

// Width of an activation chunk when `rows` rows of K do not all fit in shared memory: the widest multiple of 32
// (one MXFP4 piece; FP8 / bf16 pieces divide it) with rows x width <= MK_XS. rows <= 256 keeps it >= 32.
__device__ __forceinline__ int chunk_width(int K, int rows) {
  if ((long long)rows * K <= MK_XS) return K;
  return max(32, (MK_XS / max(rows, 1)) / 32 * 32);
}

// Shared memory: the weight ring first, then the activation rows, the tile stage, reductions, norm factors and the
// routing lists, all at compile-time offsets of the dynamic shared memory (no pointers kept in local memory).
#define SM_XS (mk_smem + RING_NS * RING_SLOT / 4)
#define SM_STAGE (SM_XS + MK_XS)
#define SM_RED (SM_STAGE + MK_STAGE)
#define SM_INV (SM_RED + MK_THREADS)
#define SM_IV (reinterpret_cast<int*>(SM_INV + MK_MAX_T))

struct Smem {
  unsigned int ring_it;  // chunks this block has streamed through the weight ring so far (same on every thread)
};

// Routing lists in iv (ints): U, routed expert ids (ascending), member counts, member starts, member pair lists
// (pair p = t * topk + k, ascending inside each expert), routing weights per pair, expert bitmap.
#define IV_U 0
#define IV_IDS 8
#define IV_RAW 264
#define IV_CNT 520
#define IV_MST 776
#define IV_ML 1040
#define IV_RW 1296
#define IV_BITS 1552
#define IV_LEN 1600

// xs[j * xstride + kk] = src[row(j) * rs + k0 + kk] for j < nrows, kk < kc, where row(j) = list ? list[j] / div : j;
// optionally scaled by inv[j] * normw[k0 + kk]. 16-byte loads, 8 in flight per thread.
__device__ __noinline__ void load_rows(const float* src, long long rs, const int* list, int div, int nrows, int k0, int kc,
                          int xstride, float* xs, const float* inv, const float* normw) {
  bool vec = ((rs | k0 | kc | xstride) & 3) == 0 && ((reinterpret_cast<uintptr_t>(src) & 15) == 0) &&
             (!normw || (reinterpret_cast<uintptr_t>(normw) & 15) == 0);
  if (vec) {
    const int q = kc >> 2;
    const int tot = nrows * q;
    for (int b = threadIdx.x; b < tot; b += 8 * MK_THREADS) {
      float4 v[8];
#pragma unroll
      for (int u = 0; u < 8; u++) {
        int i = b + u * MK_THREADS;
        if (i < tot) {
          int j = i / q, c = i - j * q;
          int row = list ? list[j] / div : j;
          v[u] = __ldcg(reinterpret_cast<const float4*>(src + row * rs + k0) + c);
        }
      }
#pragma unroll
      for (int u = 0; u < 8; u++) {
        int i = b + u * MK_THREADS;
        if (i < tot) {
          int j = i / q, c = i - j * q;
          float4 x = v[u];
          if (normw) {
            float4 g = __ldg(reinterpret_cast<const float4*>(normw + k0) + c);
            float f = inv[j];
            x.x *= f * g.x; x.y *= f * g.y; x.z *= f * g.z; x.w *= f * g.w;
          }
          *reinterpret_cast<float4*>(xs + j * xstride + 4 * c) = x;
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < nrows * kc; i += MK_THREADS) {
      int j = i / kc, k = i - j * kc;
      int row = list ? list[j] / div : j;
      float v = ldcg(src + row * rs + k0 + k);
      if (normw) v *= inv[j] * __ldg(normw + k0 + k);
      xs[j * xstride + k] = v;
    }
  }
}

// inv[t] = rsqrt(mean(x[t]^2) + eps) for rows resident in xs; then scale them by inv[t] * normw[k]. Every thread
// takes a share of each row (partial sums per warp, then one thread per row), and the scaling pass reads the
// norm weights 16 bytes at a time.
__device__ __noinline__ void rms_resident(Smem& s, int T, int K, int xstride, float eps, const float* normw) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool vec = ((K | xstride) & 3) == 0 && (reinterpret_cast<uintptr_t>(normw) & 15) == 0;
  for (int t = 0; t < T; t++) {
    float a = 0.f;
    if (vec) {
      for (int k = 4 * threadIdx.x; k < K; k += 4 * MK_THREADS) {
        float4 v = *reinterpret_cast<const float4*>(SM_XS + t * xstride + k);
        a += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    } else {
      for (int k = threadIdx.x; k < K; k += MK_THREADS) { float v = SM_XS[t * xstride + k]; a += v * v; }
    }
    a = warp_sum(a);
    if (lane == 0) SM_RED[t * MK_WARPS + warp] = a;
  }
  __syncthreads();
  if (threadIdx.x < T) {
    float a = 0.f;
    for (int w = 0; w < MK_WARPS; w++) a += SM_RED[threadIdx.x * MK_WARPS + w];
    SM_INV[threadIdx.x] = rsqrtf(a / K + eps);
  }
  __syncthreads();
  if (vec) {
    const int q = K / 4;
    for (int i = threadIdx.x; i < T * q; i += MK_THREADS) {
      const int t = i / q, c = i - t * q;
      const float4 g = __ldg(reinterpret_cast<const float4*>(normw) + c);
      float4* x = reinterpret_cast<float4*>(SM_XS + t * xstride) + c;
      const float f = SM_INV[t];
      float4 v = *x;
      v.x *= f * g.x; v.y *= f * g.y; v.z *= f * g.z; v.w *= f * g.w;
      *x = v;
    }
  } else {
    for (int i = threadIdx.x; i < T * K; i += MK_THREADS) {
      int t = i / K, k = i - t * K;
      SM_XS[t * xstride + k] *= SM_INV[t] * __ldg(normw + k);
    }
  }
}

// inv[t] = rsqrt(mean(x[t]^2) + eps) over K, read from global memory (activations too large for xs).
__device__ __noinline__ void rms_factors(const Params& p, Smem& s, int x, int xw, int K, float eps) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < p.T; t += MK_WARPS) {
    const float* row = p.arena + x + (long long)t * xw;
    float a = 0.f;
    for (int k0 = 0; k0 < K; k0 += 32 * 8) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; u++) { int k = k0 + u * 32 + lane; v[u] = k < K ? ldcg(row + k) : 0.f; }
#pragma unroll
      for (int u = 0; u < 8; u++) a += v[u] * v[u];
    }
    a = warp_sum(a);
    if (lane == 0) SM_INV[t] = rsqrtf(a / K + eps);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------------
// MATMUL: out[t, c] = epilogue((norm?(x[t]) . W[row(c)]) + bias), one tile = `tile_rows` output columns.
// With SwiGLU the tile computes gate rows c and up rows N/2 + c.

__device__ void apply_rope_stage(float* st, int stride, int T, int cols, int c0, int hd, int rot, float theta,
                                 const int* pos) {
  int half = rot / 2;
  for (int i = threadIdx.x; i < T * cols; i += MK_THREADS) {
    int t = i / cols, c = i - t * cols;
    int cg = c0 + c;
    int j = cg % hd;
    if (j >= half) continue;
    // The pair (j, j + half) lies in the tile: tiles are head aligned when RoPE is present.
    float inv_freq = powf(theta, -2.f * (float)j / (float)rot);
    float ang = (float)pos[t] * inv_freq;
    float sn, cs;
    sincosf(ang, &sn, &cs);
    float a = st[t * stride + c], b = st[t * stride + c + half];
    st[t * stride + c] = a * cs - b * sn;
    st[t * stride + c + half] = b * cs + a * sn;
  }
}

__device__ __noinline__ void op_matmul(const Params& p, Smem& s, const DInstr& I, int tile) {
  bool swiglu = false;
  for (int q = 0; q < I.nepi; q++) swiglu |= ((I.epi >> (4 * q)) & 15) == EPI_SWIGLU;
  const int outn = swiglu ? I.n / 2 : I.n;  // output columns
  const int c0 = tile * I.tile_rows;
  const int cols = min(I.tile_rows, outn - c0);
  const int nrows = swiglu ? 2 * cols : cols;  // weight rows computed
  const int sstride = 2 * I.tile_rows;
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  TileRows d{};
  d.mode = 0; d.c0 = c0; d.cols = cols; d.split = swiglu ? I.n / 2 : 0; d.w = I.w; d.ws = I.ws; d.K = I.k; d.n = p.T;
  d.sstride = sstride;
  for (int i = threadIdx.x; i < p.T * sstride; i += MK_THREADS) SM_STAGE[i] = 0.f;
  if (mk_flags[0]) {
    d.xstride = I.k;
    __syncthreads();
    rows_dot(I.fmt, p.weights, d, 0, I.k, SM_XS, nrows, SM_STAGE, mk_lut, p.T, &s.ring_it);
  } else {
    const int kcw = chunk_width(I.k, p.T);
    d.xstride = kcw;
    for (int k0 = 0; k0 < I.k; k0 += kcw) {
      int kc = min(kcw, I.k - k0);
      __syncthreads();
      load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, k0, kc, kcw, SM_XS, SM_INV, normw);
      __syncthreads();
      rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, nrows, SM_STAGE, mk_lut, p.T, &s.ring_it);
    }
  }
  __syncthreads();
  // Bias.
  if (I.bias >= 0) {
    const float* b = reinterpret_cast<const float*>(p.weights + I.bias);
    for (int i = threadIdx.x; i < p.T * nrows; i += MK_THREADS) {
      int t = i / nrows, rr = i - t * nrows;
      SM_STAGE[t * sstride + rr] += __ldg(b + d.map(rr));
    }
    __syncthreads();
  }
  // Epilogue stages in order.
  int width = nrows;
  for (int q = 0; q < I.nepi; q++) {
    int e = (I.epi >> (4 * q)) & 15;
    if (e == EPI_SCALE) {
      for (int i = threadIdx.x; i < p.T * width; i += MK_THREADS) {
        int t = i / width, c = i - t * width;
        SM_STAGE[t * sstride + c] *= I.scale;
      }
    } else if (e == EPI_ROPE) {
      apply_rope_stage(SM_STAGE, sstride, p.T, width, c0, I.hd, I.rotary, I.theta, p.pos);
    } else if (e == EPI_KVWRITE) {
      float* base = p.kv + (I.kvkind == 0 ? I.kv_k : I.kv_v);
      int rowlen = I.heads * I.hd;
      for (int i = threadIdx.x; i < p.T * width; i += MK_THREADS) {
        int t = i / width, c = i - t * width;
        int slot = p.pos[t] % I.kv_cap;
        base[(long long)slot * rowlen + c0 + c] = SM_STAGE[t * sstride + c];
      }
    } else if (e == EPI_SWIGLU) {
      for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
        int t = i / cols, c = i - t * cols;
        float g = SM_STAGE[t * sstride + c], u = SM_STAGE[t * sstride + cols + c];
        SM_STAGE[t * sstride + c] = silu_f(g) * u;
      }
      width = cols;
    } else if (e == EPI_RESIDUAL) {
      for (int i = threadIdx.x; i < p.T * width; i += MK_THREADS) {
        int t = i / width, c = i - t * width;
        SM_STAGE[t * sstride + c] += ldcg(p.arena + I.res + (long long)t * I.resw + c0 + c);
      }
    }
    __syncthreads();
  }
  if (I.out >= 0) {
    for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
      int t = i / cols, c = i - t * cols;
      p.arena[I.out + (long long)t * I.outw + c0 + c] = SM_STAGE[t * sstride + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention for one (token, head): online softmax over the visible cache positions, split across warps.
__device__ __noinline__ void op_attn(const Params& p, Smem& s, const DInstr& I, int tile) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = tile / I.nh, h = tile - t * I.nh;
  const int P = p.pos[t];
  const int lo = I.window > 0 ? max(0, P + 1 - I.window) : 0;
  const int kvh = h / (I.nh / I.nkv);
  const int qd = I.qd, vd = I.vd;
  float* q = SM_XS;  // [qd]
  for (int i = threadIdx.x; i < qd; i += MK_THREADS) q[i] = ldcg(p.arena + I.x + (long long)t * I.xw + h * qd + i);
  __syncthreads();
  const float* K = p.kv + I.kv_k;
  const float* V = p.kv + I.kv_v;
  const int krow = I.nkv * qd, vrow = I.nkv * vd;
  float m = -INFINITY, l = 0.f;
  float o[8];  // vd <= 256
#pragma unroll
  for (int j = 0; j < 8; j++) o[j] = 0.f;
  // Each warp takes 4 positions per step (loads for all 4 in flight before the reductions).
  for (int j0 = lo + warp; j0 <= P; j0 += 4 * MK_WARPS) {
    float d[4];
#pragma unroll
    for (int q4 = 0; q4 < 4; q4++) {
      int j = j0 + q4 * MK_WARPS;
      d[q4] = 0.f;
      if (j <= P) {
        const float* kp = K + (long long)(j % I.kv_cap) * krow + kvh * qd;
        for (int i = lane; i < qd; i += 32) d[q4] += q[i] * __ldcg(kp + i);
      }
    }
#pragma unroll
    for (int q4 = 0; q4 < 4; q4++) d[q4] = warp_sum(d[q4]) * I.scale;
#pragma unroll
    for (int q4 = 0; q4 < 4; q4++) {
      int j = j0 + q4 * MK_WARPS;
      if (j > P) break;
      float mn = fmaxf(m, d[q4]);
      float c = __expf(m - mn), e = __expf(d[q4] - mn);
      l = l * c + e;
      const float* vp = V + (long long)(j % I.kv_cap) * vrow + kvh * vd;
#pragma unroll
      for (int jj = 0; jj < 8; jj++) {
        int i = lane + 32 * jj;
        if (i < vd) o[jj] = o[jj] * c + e * __ldcg(vp + i);
      }
      m = mn;
    }
  }
  // Combine warps: SM_RED holds per-warp (m, l); stage holds per-warp o.
  float* wm = SM_RED;
  float* wl = SM_RED + MK_WARPS;
  float* wo = SM_XS + 1024;  // [MK_WARPS][vd], after q
  if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
  for (int jj = 0; jj < 8; jj++) {
    int i = lane + 32 * jj;
    if (i < vd) wo[warp * vd + i] = o[jj];
  }
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < MK_WARPS; w++) M = fmaxf(M, wm[w]);
  float sink = I.sinks >= 0 ? __ldg(reinterpret_cast<const float*>(p.weights + I.sinks) + h) : -INFINITY;
  float Mall = fmaxf(M, sink);
  float L = 0.f;
  for (int w = 0; w < MK_WARPS; w++) if (wl[w] > 0.f) L += wl[w] * __expf(wm[w] - Mall);
  if (I.sinks >= 0) L += __expf(sink - Mall);
  for (int i = threadIdx.x; i < vd; i += MK_THREADS) {
    float a = 0.f;
    for (int w = 0; w < MK_WARPS; w++) if (wl[w] > 0.f) a += wo[w * vd + i] * __expf(wm[w] - Mall);
    p.arena[I.out + (long long)t * I.outw + h * vd + i] = a / L;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Router for one token: logits over E experts (warp per expert), sigmoid/softmax, group-limited top-k on warp 0.
__device__ __noinline__ void op_router(const Params& p, Smem& s, const DInstr& I, int t) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int H = I.k, E = I.E;
  const float* xrow = SM_XS + (long long)t * H;
  if (!mk_flags[0]) {
    __syncthreads();
    load_rows(p.arena + I.x + (long long)t * I.xw, I.xw, nullptr, 1, 1, 0, H, H, SM_XS, nullptr, nullptr);
    xrow = SM_XS;
  }
  float* sc = SM_STAGE;       // scores [E]
  float* ch = SM_STAGE + E;   // choice scores [E]
  for (int i = threadIdx.x; i < E; i += MK_THREADS) sc[i] = 0.f;
  __syncthreads();
  TileRows d{};
  d.mode = 0; d.c0 = 0; d.cols = E; d.split = 0; d.w = I.w; d.ws = I.ws; d.K = H; d.n = 1; d.xstride = H;
  d.sstride = 0;
  rows_dot(I.fmt, p.weights, d, 0, H, xrow, E, sc, mk_lut, 1, &s.ring_it);
  __syncthreads();
  if (warp == 0) {
    // Scores.
    if (I.sigmoid) {
      for (int e = lane; e < E; e += 32) sc[e] = 1.f / (1.f + __expf(-sc[e]));
    } else {
      float mx = -INFINITY;
      for (int e = lane; e < E; e += 32) mx = fmaxf(mx, sc[e]);
      mx = warp_max(mx);
      float sum = 0.f;
      for (int e = lane; e < E; e += 32) { sc[e] = __expf(sc[e] - mx); sum += sc[e]; }
      sum = warp_sum(sum);
      for (int e = lane; e < E; e += 32) sc[e] /= sum;
    }
    __syncwarp();
    const float* bias = I.bias >= 0 ? reinterpret_cast<const float*>(p.weights + I.bias) : nullptr;
    for (int e = lane; e < E; e += 32) ch[e] = sc[e] + (bias ? __ldg(bias + e) : 0.f);
    __syncwarp();
    // Group limit: group score = sum of its top-2 choice scores; keep the best topk_group groups.
    if (I.ngroup > 1) {
      int per = E / I.ngroup;
      float* gs = SM_RED;
      if (lane < I.ngroup) {
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int e = lane * per; e < (lane + 1) * per; e++) {
          float v = ch[e];
          if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) b2 = v;
        }
        gs[lane] = b1 + b2;
      }
      __syncwarp();
      if (lane == 0) {
        unsigned int keep = 0;  // bit g set: group g kept (ties: lowest index)
        for (int k = 0; k < I.topkg; k++) {
          int best = -1;
          for (int g = 0; g < I.ngroup; g++)
            if (!((keep >> g) & 1u) && (best < 0 || gs[g] > gs[best])) best = g;
          keep |= 1u << best;
        }
        for (int g = 0; g < I.ngroup; g++)
          if (!((keep >> g) & 1u)) for (int e = g * per; e < (g + 1) * per; e++) ch[e] = -INFINITY;
      }
      __syncwarp();
    }
    // Top-k by choice score (ties: lowest index), weights from the raw scores.
    float wsum = 0.f;
    float* outrow = p.arena + I.out + (long long)t * I.outw;
    for (int k = 0; k < I.topk; k++) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int e = lane; e < E; e += 32) {
        float v = ch[e];
        if (v > bv || (v == bv && e < bi)) { bv = v; bi = e; }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if (lane == 0) {
        outrow[k] = (float)bi;
        outrow[I.topk + k] = sc[bi];
        wsum += sc[bi];
        ch[bi] = -INFINITY;
      }
      __syncwarp();
    }
    if (lane == 0) {
      for (int k = 0; k < I.topk; k++) {
        float v = outrow[I.topk + k];
        if (I.normtopk) v /= (wsum + 1e-20f);
        outrow[I.topk + k] = v * I.rscale;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// MoE. The routed experts of this forward (ascending ids) and, per expert, its (token, slot) pairs, built once
// per MoE instruction per block in parallel (see IV_*). Returns U.
__device__ __noinline__ int moe_unique(const Params& p, Smem& s, const DInstr& I) {
  const int n = p.T * I.topk, E = I.E;
  int* raw = SM_IV + IV_RAW;
  int* ids = SM_IV + IV_IDS;
  int* cnt = SM_IV + IV_CNT;
  int* mst = SM_IV + IV_MST;
  int* ml = SM_IV + IV_ML;
  float* rw = reinterpret_cast<float*>(SM_IV + IV_RW);
  unsigned int* bits = reinterpret_cast<unsigned int*>(SM_IV + IV_BITS);
  const int nw = (E + 31) / 32;
  for (int i = threadIdx.x; i < nw; i += MK_THREADS) bits[i] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += MK_THREADS) {
    int t = i / I.topk, k = i - t * I.topk;
    const float* rr = p.arena + I.aux + (long long)t * (2 * I.topk);
    int e = (int)ldcg(rr + k);
    raw[i] = e;
    rw[i] = ldcg(rr + I.topk + k);
    if ((unsigned int)e < (unsigned int)E) atomicOr(&bits[e >> 5], 1u << (e & 31));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int U = 0;
    for (int w = 0; w < nw; w++) { mst[w] = U; U += __popc(bits[w]); }
    SM_IV[IV_U] = U;
  }
  __syncthreads();
  for (int w = threadIdx.x; w < nw; w += MK_THREADS) {
    unsigned int b = bits[w];
    int pos = mst[w];
    while (b) { int j = __ffs(b) - 1; ids[pos++] = w * 32 + j; b &= b - 1; }
  }
  __syncthreads();
  const int U = SM_IV[IV_U];
  for (int u = threadIdx.x; u < U; u += MK_THREADS) {
    int e = ids[u], c = 0;
    for (int i = 0; i < n; i++) c += raw[i] == e;
    cnt[u] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int a = 0, mx = 0;
    for (int u = 0; u < U; u++) { mst[u] = a; a += cnt[u]; mx = max(mx, cnt[u]); }
    mst[U] = a;
    SM_IV[IV_U + 1] = mx;
  }
  __syncthreads();
  for (int u = threadIdx.x; u < U; u += MK_THREADS) {
    int e = ids[u], pos = mst[u];
    for (int i = 0; i < n; i++) if (raw[i] == e) ml[pos++] = i;
  }
  __syncthreads();
  return U;
}

// UP: the block's share of (routed expert, column tile) work. Blocks are split into contiguous groups, one group
// per routed expert, so a block loads its expert's member activations once and streams all of its column tiles
// (batched as far as the stage holds them) through one pass of the weight ring. scratch[(t * topk + k) * inter + c] = silu(gate) * up for every member pair (t, k).
__device__ __noinline__ void op_moe_up(const Params& p, Smem& s, const DInstr& I) {
  const int G = gridDim.x, b = blockIdx.x;
  const int U = SM_IV[IV_U];
  const int ctiles = (I.inter + I.tile_rows - 1) / I.tile_rows;
  const int* ids = SM_IV + IV_IDS;
  const int* cnt = SM_IV + IV_CNT;
  const int* mst = SM_IV + IV_MST;
  const int* ml = SM_IV + IV_ML;
  int u0, ustep, q, nb;
  if (U <= G) {
    u0 = ((b + 1) * U - 1) / G;
    const int st = u0 * G / U;
    nb = (u0 + 1) * G / U - st;
    q = b - st;
    ustep = U;
  } else {
    u0 = b; ustep = G; q = 0; nb = 1;
  }
  for (int u = u0; u < U; u += ustep) {
    const int m = cnt[u];
    const int* mem = ml + mst[u];
    long long we, wse;
    expert_offsets(I.fmt, I.w, I.ws, ids[u], 2 * I.inter, I.k, &we, &wse);
    const int kcw = chunk_width(I.k, m);
    const bool full = kcw == I.k;
    const int tr = I.tile_rows;
    const int nt = q < ctiles ? (ctiles - q + nb - 1) / nb : 0;  // this block's column tiles of expert u
    const int B = max(1, MK_STAGE / (m * 2 * tr));                // tiles per batch (stage capacity)
    __syncthreads();
    if (full && nt > 0) load_rows(p.arena + I.x, I.xw, mem, I.topk, m, 0, I.k, I.k, SM_XS, nullptr, nullptr);
    for (int jb = 0; jb < nt; jb += B) {
      const int nbt = min(B, nt - jb);
      const int sstride = nbt * 2 * tr;
      TileRows d{};
      d.mode = 3; d.c0 = (q + jb * nb) * tr; d.cols = tr; d.split = I.inter; d.jstride = nb * tr; d.w = we;
      d.ws = wse; d.K = I.k; d.n = m; d.xstride = kcw; d.sstride = sstride;
      for (int i = threadIdx.x; i < m * sstride; i += MK_THREADS) SM_STAGE[i] = 0.f;
      if (full) {
        __syncthreads();
        rows_dot(I.fmt, p.weights, d, 0, I.k, SM_XS, sstride, SM_STAGE, mk_lut, m, &s.ring_it);
      } else {
        for (int k0 = 0; k0 < I.k; k0 += kcw) {
          int kc = min(kcw, I.k - k0);
          __syncthreads();
          load_rows(p.arena + I.x, I.xw, mem, I.topk, m, k0, kc, kcw, SM_XS, nullptr, nullptr);
          __syncthreads();
          rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, sstride, SM_STAGE, mk_lut, m, &s.ring_it);
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < m * nbt * tr; i += MK_THREADS) {
        const int jm = i / (nbt * tr), rem = i - jm * (nbt * tr);
        const int j = rem / tr, c = rem - j * tr;
        const int col = (q + (jb + j) * nb) * tr + c;
        if (col >= I.inter) continue;
        float g = SM_STAGE[jm * sstride + j * 2 * tr + c], uu = SM_STAGE[jm * sstride + j * 2 * tr + tr + c];
        p.scratch[(long long)mem[jm] * I.inter + col] = silu_f(g) * uu;
      }
      __syncthreads();
    }
  }
}

// DOWN: tile = output column tile over H; its rows span the routed experts, so one pipelined pass streams the
// tile's expert rows. When all (token, slot) activation rows do not fit in shared memory, the experts go in groups
// whose member rows fit (packed), and only a single expert with too many members falls back to chunking K.
// out[t, c] = sum_k w[t,k] * down_{e(t,k)}[c] . scratch[t,k] (k ascending).
__device__ __noinline__ void op_moe_down(const Params& p, Smem& s, const DInstr& I, int tile) {
  const int U = SM_IV[IV_U], P = p.T * I.topk, H = I.n;
  const int c0 = tile * I.tile_rows, cols = min(I.tile_rows, H - c0);
  const int colsp = (cols + 3) & ~3;
  const int sstride = I.tile_rows;
  const int* ids = SM_IV + IV_IDS;
  const int* cnt = SM_IV + IV_CNT;
  const int* mst = SM_IV + IV_MST;
  const int* ml = SM_IV + IV_ML;
  const int maxm = SM_IV[IV_U + 1];
  for (int i = threadIdx.x; i < P * sstride; i += MK_THREADS) SM_STAGE[i] = 0.f;
  TileRows d{};
  d.mode = 2; d.c0 = c0; d.cols = cols; d.w = I.w; d.ws = I.ws; d.erows = H; d.K = I.inter; d.sstride = sstride;
  d.ml = ml;
  if (mk_flags[0]) {
    // Every pair row is resident (prep), indexed by pair id.
    d.ids = ids; d.cnt = cnt; d.mst = mst; d.xpack = -1; d.xstride = I.inter;
    __syncthreads();
    rows_dot(I.fmt, p.weights, d, 0, I.inter, SM_XS, U * colsp, SM_STAGE, mk_lut, maxm, &s.ring_it);
  } else {
    const int cap = MK_XS / I.inter;  // member rows that fit at full width
    for (int ua = 0; ua < U;) {
      int ub = ua + 1;
      while (ub < U && mst[ub + 1] - mst[ua] <= cap) ub++;
      const int m = mst[ub] - mst[ua];
      int gm = 0;
      for (int u = ua; u < ub; u++) gm = max(gm, cnt[u]);
      const int kcw = chunk_width(I.inter, m);
      d.ids = ids + ua; d.cnt = cnt + ua; d.mst = mst + ua; d.xpack = mst[ua]; d.xstride = kcw;
      for (int k0 = 0; k0 < I.inter; k0 += kcw) {
        const int kc = min(kcw, I.inter - k0);
        __syncthreads();
        load_rows(p.scratch, I.inter, ml + mst[ua], 1, m, k0, kc, kcw, SM_XS, nullptr, nullptr);
        __syncthreads();
        rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, (ub - ua) * colsp, SM_STAGE, mk_lut, gm, &s.ring_it);
      }
      ua = ub;
    }
  }
  __syncthreads();
  const float* rw = reinterpret_cast<const float*>(SM_IV + IV_RW);
  for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
    int t = i / cols, c = i - t * cols;
    float a = 0.f;
    for (int k = 0; k < I.topk; k++) a += rw[t * I.topk + k] * SM_STAGE[(t * I.topk + k) * sstride + c];
    p.arena[I.out + (long long)t * I.outw + c0 + c] = a;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row-wise small ops: one tile = one token.
__device__ __noinline__ void op_rowwise(const Params& p, Smem& s, const DInstr& I, int t) {
  float* out = p.arena + I.out + (long long)t * I.outw;
  const float* x = p.arena + I.x + (long long)t * I.xw;
  switch (I.op) {
    case OP_EMBED: {
      int tok = p.tokens[t];
      long long base = (long long)tok * I.k;
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) {
        float v;
        if (I.fmt == FMT_BF16) v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.weights + I.w)[base + i]);
        else if (I.fmt == FMT_F32) v = reinterpret_cast<const float*>(p.weights + I.w)[base + i];
        else v = __half2float(reinterpret_cast<const __half*>(p.weights + I.w)[base + i]);
        out[i] = v;
      }
      break;
    }
    case OP_RMSNORM: {
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
      float a = 0.f;
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) { float v = ldcg(x + i); a += v * v; }
      a = warp_sum(a);
      if (lane == 0) SM_RED[warp] = a;
      __syncthreads();
      float tot = 0.f;
      for (int w = 0; w < MK_WARPS; w++) tot += SM_RED[w];
      float inv = rsqrtf(tot / I.k + I.eps);
      const float* g = reinterpret_cast<const float*>(p.weights + I.normw);
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = ldcg(x + i) * inv * __ldg(g + i);
      break;
    }
    case OP_ROPE: {
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) SM_XS[i] = ldcg(x + i);
      __syncthreads();
      apply_rope_stage(SM_XS, 0, 1, I.k, 0, I.hd, I.rotary, I.theta, p.pos + t);
      __syncthreads();
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = SM_XS[i];
      break;
    }
    case OP_KVWRITE: {
      float* base = p.kv + (I.kvkind == 0 ? I.kv_k : I.kv_v);
      int slot = p.pos[t] % I.kv_cap;
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) base[(long long)slot * I.k + i] = ldcg(x + i);
      break;
    }
    case OP_SWIGLU: {
      int h = I.k / 2;
      for (int i = threadIdx.x; i < h; i += MK_THREADS) out[i] = silu_f(ldcg(x + i)) * ldcg(x + h + i);
      break;
    }
    case OP_SCALE:
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = ldcg(x + i) * I.scale;
      break;
    case OP_ADD: {
      const float* y = p.arena + I.res + (long long)t * I.resw;
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = ldcg(x + i) + ldcg(y + i);
      break;
    }
    case OP_ARGMAX: {
      // Greedy argmax, or Gumbel-max sampling at temperature > 0 (exact sampling from softmax(logits / T)).
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) {
        float v = ldcg(x + i);
        if (p.temperature > 0.f) {
          unsigned long long h = p.seed ^ (0x9E3779B97F4A7C15ull * (unsigned long long)(p.pos[t] + 1)) ^
                                 (0xD1B54A32D192ED03ull * (unsigned long long)(i + 1));
          h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
          float uu = ((h >> 40) + 0.5f) * (1.0f / 16777216.0f);
          v = v / p.temperature - __logf(-__logf(uu));
        }
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if (lane == 0) { SM_RED[warp] = bv; SM_IV[warp] = bi; }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int w = 1; w < MK_WARPS; w++)
          if (SM_RED[w] > bv || (SM_RED[w] == bv && SM_IV[w] < bi)) { bv = SM_RED[w]; bi = SM_IV[w]; }
        // Lane 0 of warp 0 holds its own best already in (bv, bi).
        float b0 = SM_RED[0]; int i0 = SM_IV[0];
        if (b0 > bv || (b0 == bv && i0 < bi)) { bv = b0; bi = i0; }
        p.out_tokens[t] = bi;
      }
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-instruction preparation, run by every block that works on the instruction: activations that all of the
// block's tiles share are loaded into shared memory once (normalized in place for a fused RMSNorm), and the MoE
// routing lists are built.
__device__ __noinline__ void prep(const Params& p, Smem& s, const DInstr& I) {
  if (threadIdx.x == 0) mk_flags[0] = 0;
  if (I.op == OP_MATMUL) {
    const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
    if ((long long)p.T * I.k <= MK_XS) {
      load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, 0, I.k, I.k, SM_XS, nullptr, nullptr);
      if (normw) {
        __syncthreads();
        rms_resident(s, p.T, I.k, I.k, I.eps, normw);
      }
      if (threadIdx.x == 0) mk_flags[0] = 1;
    } else if (normw) {
      rms_factors(p, s, I.x, I.xw, I.k, I.eps);
    }
  } else if (I.op == OP_ROUTER) {
    if ((long long)p.T * I.k <= MK_XS) {
      load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, 0, I.k, I.k, SM_XS, nullptr, nullptr);
      if (threadIdx.x == 0) mk_flags[0] = 1;
    }
  } else if (I.op == OP_MOE_UP) {
    moe_unique(p, s, I);
  } else if (I.op == OP_MOE_DOWN) {
    moe_unique(p, s, I);
    const int P = p.T * I.topk;
    if ((long long)P * I.inter <= MK_XS) {
      load_rows(p.scratch, I.inter, nullptr, 1, P, 0, I.inter, I.inter, SM_XS, nullptr, nullptr);
      if (threadIdx.x == 0) mk_flags[0] = 1;
    }
  }
  __syncthreads();
}


extern "C" __global__ void __launch_bounds__(MK_THREADS, 1) mimo_forward(Params p) {
  Smem s;
  s.ring_it = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < RING_NS; i++) {
      mbar_init(mk_bars + i, 1);
      mbar_init(mk_bars + RING_NS + i, MK_CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    mk_prof_on = p.prof != nullptr;
  }
  if (threadIdx.x < 5) mk_stat[threadIdx.x] = 0;
  if (threadIdx.x < 16) mk_lut[threadIdx.x] = c_e2m1[threadIdx.x];
  __shared__ DInstr cur;
  const unsigned int G = gridDim.x;
  const unsigned int target = p.epoch * G;
  for (int i = 0; i < p.ninstr; i++) {
    unsigned long long t0 = 0, t1 = 0;
    if (p.prof && threadIdx.x == 0) t0 = gtimer();
    // Control: fetch the descriptor, wait for producers.
    if (threadIdx.x < 64) reinterpret_cast<int*>(&cur)[threadIdx.x] = reinterpret_cast<const int*>(p.instrs + i)[threadIdx.x];
    __syncthreads();
    // Negative tile counts scale with the tokens of this forward: -n means n * T tiles.
    const int ntiles = cur.ntiles < 0 ? -cur.ntiles * p.T : cur.ntiles;
    int first = ((int)blockIdx.x - cur.rot) % (int)G;
    if (first < 0) first += G;
    // MoE up schedules its own work over every block (see op_moe_up).
    if (first < ntiles || cur.op == OP_MOE_UP) {
      if (threadIdx.x == 0) {
        for (int d = 0; d < cur.ndeps; d++) {
          const unsigned int* c = p.done + cur.deps[d];
          while (ld_acquire(c) < target) __nanosleep(32);
        }
        if (p.prof) t1 = gtimer();
      }
      __syncthreads();
      prep(p, s, cur);
      if (cur.op == OP_MOE_UP) {
        op_moe_up(p, s, cur);
      } else {
        for (int tile = first; tile < ntiles; tile += G) {
          switch (cur.op) {
            case OP_MATMUL: op_matmul(p, s, cur, tile); break;
            case OP_ATTN: op_attn(p, s, cur, tile); break;
            case OP_ROUTER: op_router(p, s, cur, tile); break;
            case OP_MOE_DOWN: op_moe_down(p, s, cur, tile); break;
            default: op_rowwise(p, s, cur, tile); break;
          }
          __syncthreads();
        }
      }
    } else if (p.prof && threadIdx.x == 0) {
      t1 = t0;
    }
    // Completion: publish this block's share of instruction i (release orders all prior writes of the block).
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      red_release(p.done + i, 1u);
      if (p.prof) {
        unsigned long long* r = p.prof + ((long long)i * G + blockIdx.x) * 4;
        r[0] = t0; r[1] = t1; r[2] = gtimer(); r[3] = mk_stat[4];  // cumulative ns consumer 0 spent in the ring
      }
    }
  }
  __syncthreads();
  if (p.prof && threadIdx.x < 4) p.prof[(long long)p.ninstr * G * 4 + blockIdx.x * 4 + threadIdx.x] = mk_stat[threadIdx.x];
}
