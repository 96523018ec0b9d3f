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
// The generated file that includes this body defines MK_THREADS, MK_MAX_T, MK_KC (x-chunk width), and the plan's
// constants (see compiler/src/codegen.rs).

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
#ifndef MK_KC
#define MK_KC 1024
#endif
#ifndef MK_TILE_MAX
#define MK_TILE_MAX 256
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
// v2 GEMV core: a warp computes NR weight rows at once; each lane keeps 8 16-byte loads in flight (NR rows x U
// pieces) before any arithmetic, so an SM has 512 x 128 B = 64 KB of weight reads outstanding. Activations come
// from shared memory (xs[t * xstride + k]). MXFP4 decodes through a 16-entry shared table (one bank per entry:
// conflict-free), FP8 through the hardware e4m3x2 -> f16x2 conversion, bf16 by a shift.

// Maps a tile-local row rr to a weight row: rr < cols -> c0 + rr, else split + c0 + (rr - cols) (SwiGLU's up half).
struct RowMap {
  int c0, cols, split;
  __device__ __forceinline__ int operator()(int rr) const { return rr < cols ? c0 + rr : split + c0 + (rr - cols); }
};

template <int FMT> struct Piece;  // elements per 16-byte piece
template <> struct Piece<FMT_BF16> { static constexpr int E = 8; };
template <> struct Piece<FMT_F8> { static constexpr int E = 16; };
template <> struct Piece<FMT_MXFP4> { static constexpr int E = 32; };

template <int FMT>
__device__ __forceinline__ const uint8_t* piece_ptr(const uint8_t* W, long long w, int row, int K, int k) {
  if (FMT == FMT_BF16) return W + w + ((long long)row * K + k) * 2;
  if (FMT == FMT_F8) return W + w + (long long)row * K + k;
  return W + w + ((long long)row * K + k) / 2;
}

template <int FMT>
__device__ __forceinline__ float piece_scale(const uint8_t* W, long long ws, int row, int K, int k) {
  if (FMT == FMT_F8) return __ldg(reinterpret_cast<const float*>(W + ws) + (long long)(row / 128) * ((K + 127) / 128) + k / 128);
  if (FMT == FMT_MXFP4) return e8m0_to_f32(__ldg(W + ws + ((long long)row * K + k) / 32));
  return 1.f;
}

// acc[t] += sum_j w_j * x[t][k + j] over one piece, decoding 4 weights at a time (few live registers).
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

template <int FMT, int TM>
__device__ __forceinline__ void piece_fma(uint4 v, float sc, const float* xs, int xstride, int k, int T, float* acc,
                                          const float* lut) {
  constexpr int PE = Piece<FMT>::E;
  const unsigned int words[4] = {v.x, v.y, v.z, v.w};
  float part[TM];
#pragma unroll
  for (int t = 0; t < TM; t++) part[t] = 0.f;
#pragma unroll
  for (int q = 0; q < PE / 4; q++) {
    float w4[4];
    decode4<FMT>(words, q, sc, lut, w4);
#pragma unroll
    for (int t = 0; t < TM; t++) {
      if (t < T) {
        float4 xv = *reinterpret_cast<const float4*>(xs + t * xstride + k + 4 * q);
        part[t] += w4[0] * xv.x + w4[1] * xv.y + w4[2] * xv.z + w4[3] * xv.w;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TM; t++) acc[t] += (FMT == FMT_MXFP4) ? part[t] * sc : part[t];
}

// stage[t * sstride + rr] (+)= dot(W[rm(rr)], x[t]) for rr in [0, nrows), over k in [k0, k0 + kc).
template <int FMT, int NR, int TM>
__device__ void warp_rows(const uint8_t* W, long long w, long long ws, int K, int k0, int kc, const float* xs,
                          int xstride, int T, int nrows, RowMap rm, float* stage, int sstride, const float* lut) {
  constexpr int PE = Piece<FMT>::E;
  constexpr int U = 8 / NR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int base = warp * NR; base < nrows; base += MK_WARPS * NR) {
    int rows[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) rows[i] = base + i < nrows ? rm(base + i) : -1;
    float acc[NR][TM];
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
      for (int t = 0; t < TM; t++) acc[i][t] = 0.f;
    for (int kb = 0; kb < kc; kb += 32 * PE * U) {
      uint4 v[U][NR];
      float sc[U][NR];
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
#pragma unroll
        for (int i = 0; i < NR; i++)
          if (kk < kc && rows[i] >= 0) v[u][i] = ldg16(piece_ptr<FMT>(W, w, rows[i], K, k0 + kk));
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
#pragma unroll
        for (int i = 0; i < NR; i++)
          sc[u][i] = (kk < kc && rows[i] >= 0) ? piece_scale<FMT>(W, ws, rows[i], K, k0 + kk) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        int kk = kb + (u * 32 + lane) * PE;
        if (kk >= kc) continue;
#pragma unroll
        for (int i = 0; i < NR; i++)
          if (rows[i] >= 0) piece_fma<FMT, TM>(v[u][i], sc[u][i], xs, xstride, kk, T, acc[i], lut);
      }
    }
#pragma unroll
    for (int i = 0; i < NR; i++) {
#pragma unroll
      for (int t = 0; t < TM; t++) {
        if (t < T) {
          float r = warp_sum(acc[i][t]);
          if (lane == 0 && rows[i] >= 0) stage[t * sstride + base + i] += r;
        }
      }
    }
  }
}

// Scalar fallback for f32 / f16 weights (small tensors only).
__device__ void warp_rows_scalar(int fmt, const uint8_t* W, long long w, int K, int k0, int kc, const float* xs,
                                 int xstride, int T, int nrows, RowMap rm, float* stage, int sstride) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int rr = warp; rr < nrows; rr += MK_WARPS) {
    int r = rm(rr);
    for (int t = 0; t < T; t++) {
      float a = 0.f;
      for (int kk = lane; kk < kc; kk += 32) {
        long long idx = (long long)r * K + k0 + kk;
        float wv = fmt == FMT_F32 ? __ldg(reinterpret_cast<const float*>(W + w) + idx)
                                  : __half2float(reinterpret_cast<const __half*>(W + w)[idx]);
        a += wv * xs[t * xstride + kk];
      }
      a = warp_sum(a);
      if (lane == 0) stage[t * sstride + rr] += a;
    }
  }
}

template <int FMT>
__device__ __forceinline__ void rows_dispatch_t(const uint8_t* W, long long w, long long ws, int K, int k0, int kc,
                                                const float* xs, int xstride, int T, int nrows, RowMap rm, float* stage,
                                                int sstride, const float* lut) {
  if (T <= 4) warp_rows<FMT, 4, 4>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut);
  else if (T <= 8) warp_rows<FMT, 2, 8>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut);
  else warp_rows<FMT, 1, MK_MAX_T>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut);
}

// Accumulate a tile's dot products into stage (which the caller zeroes).
__device__ void rows_dot(int fmt, const uint8_t* W, long long w, long long ws, int K, int k0, int kc, const float* xs,
                         int xstride, int T, int nrows, RowMap rm, float* stage, int sstride, const float* lut) {
  switch (fmt) {
    case FMT_BF16: rows_dispatch_t<FMT_BF16>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut); break;
    case FMT_F8: rows_dispatch_t<FMT_F8>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut); break;
    case FMT_MXFP4: rows_dispatch_t<FMT_MXFP4>(W, w, ws, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride, lut); break;
    default: warp_rows_scalar(fmt, W, w, K, k0, kc, xs, xstride, T, nrows, rm, stage, sstride); break;
  }
}

// Width of the activation chunk held in shared memory: all of K when it fits, else a multiple of 1024.
__device__ __forceinline__ int x_chunk(int K, int T) {
  int cap = (MK_MAX_T * MK_KC) / max(T, 1);
  if (K <= cap) return K;
  return max(1024, cap / 1024 * 1024);
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

struct Smem {
  float* xs;     // [MK_MAX_T][MK_KC] activation chunk
  float* stage;  // [MK_MAX_T][2 * MK_TILE_MAX] tile outputs
  float* red;    // reductions scratch [MK_THREADS]
  float* inv;    // [MK_MAX_T] norm factors
  int* iv;       // small int scratch (routing lists)
  float* lut;    // E2M1 value table [16]
};

// Load activation chunk [T][k0, k0+kc) of `x` (row width xw) into xs, optionally scaled by inv[t] * normw[k].
__device__ void load_x_chunk(const Params& p, Smem& s, int x, int xw, int k0, int kc, int xstride, const float* normw,
                             const int* rowmap) {
  for (int i = threadIdx.x; i < p.T * kc; i += MK_THREADS) {
    int t = i / kc, k = i - t * kc;
    int src = rowmap ? rowmap[t] : t;
    float v = 0.f;
    if (src >= 0) {
      v = ldcg(p.arena + x + (long long)src * xw + k0 + k);
      if (normw) v *= s.inv[t] * __ldg(normw + k0 + k);
    }
    s.xs[t * xstride + k] = v;
  }
}

// inv[t] = rsqrt(mean(x[t]^2) + eps) over K.
__device__ void rms_factors(const Params& p, Smem& s, int x, int xw, int K, float eps) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < p.T; t += MK_WARPS) {
    float a = 0.f;
    for (int k = lane; k < K; k += 32) {
      float v = ldcg(p.arena + x + (long long)t * xw + k);
      a += v * v;
    }
    a = warp_sum(a);
    if (lane == 0) s.inv[t] = rsqrtf(a / K + eps);
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

__device__ void op_matmul(const Params& p, Smem& s, const DInstr& I, int tile) {
  bool swiglu = false;
  for (int q = 0; q < I.nepi; q++) swiglu |= ((I.epi >> (4 * q)) & 15) == EPI_SWIGLU;
  const int outn = swiglu ? I.n / 2 : I.n;  // output columns
  const int c0 = tile * I.tile_rows;
  const int cols = min(I.tile_rows, outn - c0);
  const int nrows = swiglu ? 2 * cols : cols;  // weight rows computed
  const int sstride = 2 * I.tile_rows;
  const RowMap rm{c0, cols, swiglu ? I.n / 2 : 0};
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  for (int i = threadIdx.x; i < p.T * sstride; i += MK_THREADS) s.stage[i] = 0.f;
  const int xstride = x_chunk(I.k, p.T);
  for (int k0 = 0; k0 < I.k; k0 += xstride) {
    int kc = min(xstride, I.k - k0);
    __syncthreads();
    load_x_chunk(p, s, I.x, I.xw, k0, kc, xstride, normw, nullptr);
    __syncthreads();
    rows_dot(I.fmt, p.weights, I.w, I.ws, I.k, k0, kc, s.xs, xstride, p.T, nrows, rm, s.stage, sstride, s.lut);
  }
  __syncthreads();
  // Bias.
  if (I.bias >= 0) {
    const float* b = reinterpret_cast<const float*>(p.weights + I.bias);
    for (int i = threadIdx.x; i < p.T * nrows; i += MK_THREADS) {
      int t = i / nrows, rr = i - t * nrows;
      s.stage[t * sstride + rr] += __ldg(b + rm(rr));
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
        s.stage[t * sstride + c] *= I.scale;
      }
    } else if (e == EPI_ROPE) {
      apply_rope_stage(s.stage, sstride, p.T, width, c0, I.hd, I.rotary, I.theta, p.pos);
    } else if (e == EPI_KVWRITE) {
      float* base = p.kv + (I.kvkind == 0 ? I.kv_k : I.kv_v);
      int rowlen = I.heads * I.hd;
      for (int i = threadIdx.x; i < p.T * width; i += MK_THREADS) {
        int t = i / width, c = i - t * width;
        int slot = p.pos[t] % I.kv_cap;
        base[(long long)slot * rowlen + c0 + c] = s.stage[t * sstride + c];
      }
    } else if (e == EPI_SWIGLU) {
      for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
        int t = i / cols, c = i - t * cols;
        float g = s.stage[t * sstride + c], u = s.stage[t * sstride + cols + c];
        s.stage[t * sstride + c] = silu_f(g) * u;
      }
      width = cols;
    } else if (e == EPI_RESIDUAL) {
      for (int i = threadIdx.x; i < p.T * width; i += MK_THREADS) {
        int t = i / width, c = i - t * width;
        s.stage[t * sstride + c] += ldcg(p.arena + I.res + (long long)t * I.resw + c0 + c);
      }
    }
    __syncthreads();
  }
  if (I.out >= 0) {
    for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
      int t = i / cols, c = i - t * cols;
      p.arena[I.out + (long long)t * I.outw + c0 + c] = s.stage[t * sstride + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention for one (token, head): online softmax over the visible cache positions, split across warps.
__device__ void op_attn(const Params& p, Smem& s, const DInstr& I, int tile) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = tile / I.nh, h = tile - t * I.nh;
  const int P = p.pos[t];
  const int lo = I.window > 0 ? max(0, P + 1 - I.window) : 0;
  const int kvh = h / (I.nh / I.nkv);
  const int qd = I.qd, vd = I.vd;
  float* q = s.xs;  // [qd]
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
  // Combine warps: s.red holds per-warp (m, l); stage holds per-warp o.
  float* wm = s.red;
  float* wl = s.red + MK_WARPS;
  float* wo = s.stage;  // [MK_WARPS][vd]
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
__device__ void op_router(const Params& p, Smem& s, const DInstr& I, int t) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int H = I.k, E = I.E;
  float* xs = s.xs;  // one row, H <= MK_KC * MK_MAX_T
  for (int i = threadIdx.x; i < H; i += MK_THREADS) xs[i] = ldcg(p.arena + I.x + (long long)t * I.xw + i);
  __syncthreads();
  float* sc = s.stage;       // scores [E]
  float* ch = s.stage + E;   // choice scores [E]
  for (int i = threadIdx.x; i < E; i += MK_THREADS) sc[i] = 0.f;
  __syncthreads();
  rows_dot(I.fmt, p.weights, I.w, I.ws, H, 0, H, xs, H, 1, E, RowMap{0, E, 0}, sc, 0, s.lut);
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
      float* gs = s.red;
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
// MoE. Unique experts of this forward (sorted by id) and, per expert, the (token, slot) pairs that chose it.
// iv layout: [0] = count U, [1 + u] = expert id, then member lists: iv[64 + u * MK_MAX_T * 8 ...].
__device__ int moe_unique(const Params& p, Smem& s, const DInstr& I) {
  // Load the routing indices in parallel (they are floats in the routing buffer), then dedupe on one thread from
  // shared memory. Called once per MoE instruction per block, not per tile.
  const int n = p.T * I.topk;
  int* raw = s.iv + 256;
  for (int i = threadIdx.x; i < n; i += MK_THREADS) {
    int t = i / I.topk, k = i - t * I.topk;
    raw[i] = (int)ldcg(p.arena + I.aux + (long long)t * (2 * I.topk) + k);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int U = 0;
    int* ids = s.iv + 1;
    for (int i = 0; i < n; i++) {
      int e = raw[i];
      int found = 0;
      for (int u = 0; u < U; u++) if (ids[u] == e) { found = 1; break; }
      if (!found) ids[U++] = e;
    }
    // Sort ascending (insertion sort; U <= T * topk).
    for (int a = 1; a < U; a++) {
      int v = ids[a], b = a - 1;
      while (b >= 0 && ids[b] > v) { ids[b + 1] = ids[b]; b--; }
      ids[b + 1] = v;
    }
    s.iv[0] = U;
  }
  __syncthreads();
  return s.iv[0];
}

// UP: tile = (unique expert u, column tile). scratch[(t * topk + k) * inter + c] = silu(g) * u for members.
__device__ void op_moe_up(const Params& p, Smem& s, const DInstr& I, int tile) {
  int ctiles = (I.inter + I.tile_rows - 1) / I.tile_rows;
  int u = tile / ctiles, ct = tile - u * ctiles;
  int U = s.iv[0];  // computed once per instruction by moe_unique
  if (u >= U) return;
  int e = s.iv[1 + u];
  // Row map: token t participates if it chose e; rowmap[t] = t or -1, slot[t] = k.
  int* rowmap = s.iv + 512;
  int* slot = s.iv + 512 + MK_MAX_T;
  if (threadIdx.x < p.T) {
    int t = threadIdx.x;
    rowmap[t] = -1;
    for (int k = 0; k < I.topk; k++)
      if ((int)ldcg(p.arena + I.aux + (long long)t * (2 * I.topk) + k) == e) { rowmap[t] = t; slot[t] = k; }
  }
  long long we, wse;
  expert_offsets(I.fmt, I.w, I.ws, e, 2 * I.inter, I.k, &we, &wse);
  const int c0 = ct * I.tile_rows, cols = min(I.tile_rows, I.inter - c0);
  const int sstride = 2 * I.tile_rows;
  const RowMap rm{c0, cols, I.inter};
  for (int i = threadIdx.x; i < p.T * sstride; i += MK_THREADS) s.stage[i] = 0.f;
  const int xstride = x_chunk(I.k, p.T);
  for (int k0 = 0; k0 < I.k; k0 += xstride) {
    int kc = min(xstride, I.k - k0);
    __syncthreads();
    load_x_chunk(p, s, I.x, I.xw, k0, kc, xstride, nullptr, rowmap);
    __syncthreads();
    rows_dot(I.fmt, p.weights, we, wse, I.k, k0, kc, s.xs, xstride, p.T, 2 * cols, rm, s.stage, sstride, s.lut);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
    int t = i / cols, c = i - t * cols;
    if (rowmap[t] < 0) continue;
    float g = s.stage[t * sstride + c], uu = s.stage[t * sstride + cols + c];
    p.scratch[((long long)t * I.topk + slot[t]) * I.inter + c0 + c] = silu_f(g) * uu;
  }
}

// DOWN: tile = output column tile over H. out[t, c] = sum_k w[t,k] * down_{e(t,k)}[c] . scratch[t,k].
__device__ void op_moe_down(const Params& p, Smem& s, const DInstr& I, int tile) {
  int U = s.iv[0];  // computed once per instruction by moe_unique
  const int H = I.n;
  const int c0 = tile * I.tile_rows, cols = min(I.tile_rows, H - c0);
  const int sstride = 2 * I.tile_rows;
  float* outacc = s.stage + MK_MAX_T * sstride;  // [T][tile_rows]
  for (int i = threadIdx.x; i < p.T * I.tile_rows; i += MK_THREADS) outacc[i] = 0.f;
  int* rowmap = s.iv + 512;
  int* slot = s.iv + 512 + MK_MAX_T;
  float* wt = reinterpret_cast<float*>(s.iv + 512 + 2 * MK_MAX_T);
  const RowMap rm{c0, cols, 0};
  const int xstride = x_chunk(I.inter, p.T);
  for (int u = 0; u < U; u++) {
    int e = s.iv[1 + u];
    __syncthreads();
    if (threadIdx.x < p.T) {
      int t = threadIdx.x;
      rowmap[t] = -1;
      wt[t] = 0.f;
      for (int k = 0; k < I.topk; k++) {
        const float* rr = p.arena + I.aux + (long long)t * (2 * I.topk);
        if ((int)ldcg(rr + k) == e) { rowmap[t] = t; slot[t] = k; wt[t] = ldcg(rr + I.topk + k); }
      }
    }
    long long we, wse;
    expert_offsets(I.fmt, I.w, I.ws, e, H, I.inter, &we, &wse);
    for (int i = threadIdx.x; i < p.T * sstride; i += MK_THREADS) s.stage[i] = 0.f;
    for (int k0 = 0; k0 < I.inter; k0 += xstride) {
      int kc = min(xstride, I.inter - k0);
      __syncthreads();
      for (int i = threadIdx.x; i < p.T * kc; i += MK_THREADS) {
        int t = i / kc, k = i - t * kc;
        s.xs[t * xstride + k] =
            rowmap[t] >= 0 ? __ldcg(p.scratch + ((long long)t * I.topk + slot[t]) * I.inter + k0 + k) : 0.f;
      }
      __syncthreads();
      rows_dot(I.fmt, p.weights, we, wse, I.inter, k0, kc, s.xs, xstride, p.T, cols, rm, s.stage, sstride, s.lut);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
      int t = i / cols, c = i - t * cols;
      if (rowmap[t] >= 0) outacc[t * I.tile_rows + c] += wt[t] * s.stage[t * sstride + c];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.T * cols; i += MK_THREADS) {
    int t = i / cols, c = i - t * cols;
    p.arena[I.out + (long long)t * I.outw + c0 + c] = outacc[t * I.tile_rows + c];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row-wise small ops: one tile = one token.
__device__ void op_rowwise(const Params& p, Smem& s, const DInstr& I, int t) {
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
      if (lane == 0) s.red[warp] = a;
      __syncthreads();
      float tot = 0.f;
      for (int w = 0; w < MK_WARPS; w++) tot += s.red[w];
      float inv = rsqrtf(tot / I.k + I.eps);
      const float* g = reinterpret_cast<const float*>(p.weights + I.normw);
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = ldcg(x + i) * inv * __ldg(g + i);
      break;
    }
    case OP_ROPE: {
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) s.xs[i] = ldcg(x + i);
      __syncthreads();
      apply_rope_stage(s.xs, 0, 1, I.k, 0, I.hd, I.rotary, I.theta, p.pos + t);
      __syncthreads();
      for (int i = threadIdx.x; i < I.k; i += MK_THREADS) out[i] = s.xs[i];
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
      if (lane == 0) { s.red[warp] = bv; s.iv[warp] = bi; }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int w = 1; w < MK_WARPS; w++)
          if (s.red[w] > bv || (s.red[w] == bv && s.iv[w] < bi)) { bv = s.red[w]; bi = s.iv[w]; }
        // Lane 0 of warp 0 holds its own best already in (bv, bi).
        float b0 = s.red[0]; int i0 = s.iv[0];
        if (b0 > bv || (b0 == bv && i0 < bi)) { bv = b0; bi = i0; }
        p.out_tokens[t] = bi;
      }
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(MK_THREADS, 1) mimo_forward(Params p) {
  extern __shared__ __align__(16) float smem[];
  Smem s;
  s.xs = smem;
  s.stage = s.xs + MK_MAX_T * MK_KC;
  s.red = s.stage + 2 * MK_MAX_T * MK_TILE_MAX + MK_MAX_T * MK_TILE_MAX;
  s.inv = s.red + MK_THREADS;
  s.iv = reinterpret_cast<int*>(s.inv + MK_MAX_T);
  __shared__ float lut[16];
  s.lut = lut;
  if (threadIdx.x < 16) lut[threadIdx.x] = c_e2m1[threadIdx.x];
  __shared__ DInstr cur;
  const unsigned int G = gridDim.x;
  const unsigned int target = p.epoch * G;
  for (int i = 0; i < p.ninstr; i++) {
    // Control: fetch the descriptor, wait for producers.
    if (threadIdx.x < 64) reinterpret_cast<int*>(&cur)[threadIdx.x] = reinterpret_cast<const int*>(p.instrs + i)[threadIdx.x];
    __syncthreads();
    // Negative tile counts scale with the tokens of this forward: -n means n * T tiles.
    const int ntiles = cur.ntiles < 0 ? -cur.ntiles * p.T : cur.ntiles;
    int first = ((int)blockIdx.x - cur.rot) % (int)G;
    if (first < 0) first += G;
    if (first < ntiles) {
      if (threadIdx.x == 0) {
        for (int d = 0; d < cur.ndeps; d++) {
          const unsigned int* c = p.done + cur.deps[d];
          while (ld_acquire(c) < target) __nanosleep(32);
        }
      }
      __syncthreads();
      if (cur.op == OP_MATMUL && cur.normw >= 0) rms_factors(p, s, cur.x, cur.xw, cur.k, cur.eps);
      int lim = ntiles;
      if (cur.op == OP_MOE_UP || cur.op == OP_MOE_DOWN) {
        int U = moe_unique(p, s, cur);
        // Only tiles of experts some token chose do work.
        if (cur.op == OP_MOE_UP) lim = min(ntiles, U * ((cur.inter + cur.tile_rows - 1) / cur.tile_rows));
      }
      for (int tile = first; tile < lim; tile += G) {
        switch (cur.op) {
          case OP_MATMUL: op_matmul(p, s, cur, tile); break;
          case OP_ATTN: op_attn(p, s, cur, tile); break;
          case OP_ROUTER: op_router(p, s, cur, tile); break;
          case OP_MOE_UP: op_moe_up(p, s, cur, tile); break;
          case OP_MOE_DOWN: op_moe_down(p, s, cur, tile); break;
          default: op_rowwise(p, s, cur, tile); break;
        }
        __syncthreads();
      }
    }
    // Completion: publish this block's share of instruction i (release orders all prior writes of the block).
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      red_release(p.done + i, 1u);
    }
  }
}
