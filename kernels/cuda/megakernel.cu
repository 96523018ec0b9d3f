// mimo persistent megakernel: one launch runs a whole forward (decode step or verify block).
//
// Grid = one block per SM (cooperative launch, so every block is resident). Every block walks the same
// instruction stream; instruction i is split into `ntiles` tiles and block b runs tiles
// (b - rot_i) mod G, (b - rot_i) mod G + G, ... (rot_i assigned at compile time to balance bytes across blocks).
// Dependencies are per-instruction completion counters in global memory: after its tiles of instruction i a
// block does a release-increment of done[i]; before instruction j a block acquire-waits until done[d] reaches
// epoch * G for every producer d of j. No kernel boundary inside a forward.
//
// Warp roles inside a block: thread 0 fetches the next instruction descriptor into shared memory and spins on the
// dependency counters (the control role); the last warp is the producer, streaming weight row segments into a
// shared-memory ring with the bulk-copy engine; the other warps are consumers, decoding MXFP4 / FP8 / bf16 to f16
// in registers and multiplying on the tensor cores (see "v8 GEMV / small-GEMM core"), and share the activation
// loads, attention, routing and epilogues.
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
// MK_DEC=1 (experiment knob, session 20): the producer warp is decoupled from the block. It walks the instruction
// stream on its own (producer_main) and streams every ring call's weights as soon as slots free up, never waiting on
// dependencies, barriers or block-wide loops; block barriers are consumer-only named barriers and block-wide loops
// stride over the consumer warps (MK_BW warps, MK_BT threads). 0: the producer takes part in both (v22).
#ifndef MK_DEC
#define MK_DEC 0
#endif
#define MK_BW (MK_DEC ? MK_WARPS - 1 : MK_WARPS)  // warps that share block-wide work
#define MK_BT (MK_BW * 32)                         // threads that share block-wide work

enum Op {
  OP_EMBED = 0, OP_RMSNORM = 1, OP_MATMUL = 2, OP_ROPE = 3, OP_KVWRITE = 4, OP_ATTN = 5, OP_ROUTER = 6,
  OP_MOE_UP = 7, OP_MOE_DOWN = 8, OP_SWIGLU = 9, OP_SCALE = 10, OP_ADD = 11, OP_ARGMAX = 12
};
enum Fmt { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_F8 = 3, FMT_MXFP4 = 4 };
// Epilogue stage codes (up to 6 stages, 4 bits each, in order).
// EPI_ROPE2: RoPE on split-pair tiles (see matmul_geom); EPI_ROPE: on head-aligned tiles.
enum Epi { EPI_NONE = 0, EPI_SCALE = 1, EPI_ROPE = 2, EPI_KVWRITE = 3, EPI_SWIGLU = 4, EPI_RESIDUAL = 5, EPI_ROPE2 = 6 };

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
  // TMA tensor maps of the ring-streamed weights, 3 per instruction (128 bytes each: the weights as a 3-D
  // [kunit][row][128 B] view, as a 2-D [row][K bytes] view, the MXFP4 scales [row][K / 32]) and per instruction
  // which of them the runtime could encode (bits 1, 2, 4); null when the runtime has none.
  const uint8_t* tmaps;
  const unsigned int* tmok;
  // Pre-tiled weights (see mimo_tile): the buffer, and per instruction its weights' and MXFP4 scales' byte
  // offsets in it and the tiled tensor's 16-row block count (-1 / 0: the instruction has none); null: none at all.
  const uint8_t* tiled;
  const long long* tinfo;
};

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

// Dependency counters: polled with relaxed loads (an acquire load invalidates the SM's L1 on every poll, local
// memory included), then one acquire fence once the count is reached (the PTX acquire pattern).
__device__ __forceinline__ unsigned int ld_relaxed(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void fence_acquire() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ void red_release(unsigned int* p, unsigned int v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Activations written by other blocks in this launch: read through L2, never a stale L1 line.
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }

__device__ __forceinline__ float bf16lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

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

// Mode 2 rows per expert: the tile's columns padded to whole 16-row MMA tiles (a tile never straddles experts).
__device__ __forceinline__ int moe_colsp(int cols) { return (cols + 15) & ~15; }

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}
// An int of a shared-memory list reached through a generic pointer (the MoE routing lists TileRows points at),
// loaded as shared memory: LDS instead of a generic load resolved at run time.
__device__ __forceinline__ int sld(const int* p) {
  int v;
  asm volatile("ld.shared.s32 %0, [%1];" : "=r"(v) : "r"(smem_u32(p)));
  return v;
}

// n / d for 0 <= n < 2^31 by a multiply-high, an add and a shift (Granlund-Montgomery, rounding the magic up):
// the consumers' per-group row bookkeeping divides by per-call constants, each a ~20-instruction sequence as a
// plain unsigned division.
struct FastDiv {
  unsigned int m, s;
  __device__ __forceinline__ void init(unsigned int d) {  // 1 <= d < 2^31
    s = 0;
    while ((1u << s) < d) s++;
    m = (unsigned int)(((1ull << 32) * ((1ull << s) - d)) / d + 1);
  }
  __device__ __forceinline__ unsigned int div(unsigned int n) const { return (__umulhi(n, m) + n) >> s; }
};

// a / b for 0 <= a < 2^12 and 1 <= b <= 64 (the cross-warp sum's element -> (row, token) split): (a + 1/2) / b
// is at least 1 / (2b) from an integer, far more than the approximate divide's error (~2^-22 relative).
__device__ __forceinline__ int div_small(int a, int b) { return (int)__fdividef((float)a + 0.5f, (float)b); }

// Row and column indices here are never negative: their divisions are done unsigned (fewer instructions than
// signed ones on the consumers' per-group path), by FastDiv where the divisor is fixed for the call.
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
  FastDiv rdiv;         // division by 2 * cols (mode 3) or moe_colsp(cols) (mode 2); set by rows_dot
  // Activation row of member t of a mode-2 list starting at xl (packed or indexed by pair id).
  __device__ __forceinline__ int xrow(int xl, int t) const { return xpack >= 0 ? xl + t - xpack : sld(ml + xl + t); }
  __device__ __forceinline__ int map(int rr) const {
    if (mode == 3) {
      const int j = (int)rdiv.div((unsigned)rr), r = rr - j * 2 * cols;
      const int c = c0 + j * jstride + (r < cols ? r : r - cols);
      return r < cols ? c : split + c;
    }
    return rr < cols ? c0 + rr : split + c0 + (rr - cols);
  }
  // Mode 3 rows past the last column (a partial final tile) do nothing.
  __device__ __forceinline__ bool valid(int rr) const {
    if (mode != 3) return true;
    const int j = (int)rdiv.div((unsigned)rr), r = rr - j * 2 * cols;
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
  if (FMT == FMT_F8) return W + ws + (long long)(row >> 7) * ((K + 127) >> 7) * 4;
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

// The output side of tile row r: output column, activation rows (n of them; mode 2: the members of routed expert
// u starting at list index xl, else xl = -1 and u = 0). False for rows past nrows or padding.
__device__ __forceinline__ bool row_out(const TileRows& d, int r, int nrows, int& col, int& n, int& xl, int& u) {
  u = 0;
  if (r >= nrows) return false;
  if (d.mode == 2) {
    const int colsp = moe_colsp(d.cols);
    u = (int)d.rdiv.div((unsigned)r);
    col = r - u * colsp;
    n = sld(d.cnt + u);
    xl = sld(d.mst + u);
    return col < d.cols;
  }
  col = r;
  n = d.n;
  xl = -1;
  return d.valid(r);
}

// row_out's answer alone: whether tile row r computes an output (mode 2: inside its expert's columns, not padding).
__device__ __forceinline__ bool row_ok(const TileRows& d, int r, int nrows) {
  if (r >= nrows) return false;
  if (d.mode == 2) return r - (int)d.rdiv.div((unsigned)r) * moe_colsp(d.cols) < d.cols;
  return d.valid(r);
}

// Scalar path for f32 / f16 weights (small tensors only: the router). Reads plain float activations.
__device__ __noinline__ void warp_rows_scalar(int fmt, const uint8_t* W, const TileRows& d, int k0, int kc, const float* xs,
                                 int nrows, float* stage) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int rr = warp; rr < nrows; rr += MK_BW) {
    long long wb = d.w;
    int row, n, xl, col, u;
    if (!row_out(d, rr, nrows, col, n, xl, u)) continue;
    if (d.mode == 2) {
      long long wse;
      expert_offsets(fmt, d.w, d.ws, sld(d.ids + u), d.erows, d.K, &wb, &wse);
      row = d.c0 + col;
    } else {
      row = d.map(rr);
    }
    for (int t = 0; t < n; t++) {
      int xr = xl >= 0 ? d.xrow(xl, t) : t;
      int orow = xl >= 0 ? sld(d.ml + xl + t) : t;
      // 8 independent loads per lane in flight, 8 partial sums.
      float a8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int kb = 0; kb < kc; kb += 256) {
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const int kk = kb + 32 * u + lane;
          if (kk < kc) {
            long long idx = (long long)row * d.K + k0 + kk;
            float wv = fmt == FMT_F32 ? __ldg(reinterpret_cast<const float*>(W + wb) + idx)
                                      : __half2float(reinterpret_cast<const __half*>(W + wb)[idx]);
            a8[u] += wv * xs[xr * d.xstride + kk];
          }
        }
      }
      float a = ((a8[0] + a8[1]) + (a8[2] + a8[3])) + ((a8[4] + a8[5]) + (a8[6] + a8[7]));
      a = warp_sum(a);
      if (lane == 0) stage[orow * d.sstride + col] += a;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// v8 GEMV / small-GEMM core: warp-specialized weight ring feeding tensor cores.
//
// Warp MK_CW (the producer) streams weight row segments HBM -> shared memory with the bulk-copy engine
// (cp.async.bulk, completion counted in bytes on an mbarrier) into a RING_NS-slot ring; warps 0..MK_CW-1 (the
// consumers) wait on a slot's "full" barrier, decode the weights to f16 in registers and multiply them on the
// tensor cores (mma.sync m16n8k16, f32 accumulate), then release the slot on its "empty" barrier. A slot holds
// one chunk: RING_ROWS = 32 rows (two 16-row MMA tiles) x one RING_SEG-byte segment along K, rows at a padded
// pitch so the consumers' fragment loads hit distinct banks, plus (MXFP4 rows whose scales are 16-byte aligned)
// the segment's scale bytes. Both sides walk the same chunk sequence and keep the same running chunk counter,
// which gives slot and phase.
//
// The K steps (32 elements) of a row group are dealt round-robin to the consumer warps; each warp keeps f32
// partial sums for both row tiles and up to 16 tokens, and at the end of the group the warps' partials are summed
// in a fixed order (deterministic) into the stage.
//
// Activations: the MMA wants f16 operands. Each activation x is split into hi = f16(x) and lo = f16(x - hi) and
// both are multiplied (weights are exact in f16: E2M1 and E4M3 values are, bf16 values are within f16's range
// for weights), so the products keep ~22 bits of x: the result matches an f32 dot product to ~1e-6 relative.
// xs_frag rewrites the activation rows in place into the B-fragment order, once per load.
//
// The K order inside a 32-element step is permuted identically for weights and activations (a dot product does not
// care): lane quad t holds elements 8t .. 8t + 7, paired (8t + q, 8t + q + 4), q < 4, which is what makes the
// MXFP4 decode cheap (the two nibbles of a pair sit 16 bits apart, like the two halves of an f16x2).

// MK_PHASE=N (diagnostic builds; the profile's ring column then reports thread 0's time in one phase instead of
// the ring): 1 prep, 2 a matmul tile from op_matmul's entry to its first ring call, 3 from a ring call's end to
// matmul_finish, 4 matmul_finish, 5 from the end of an instruction's work to its completion release, 6 the
// producer warp issuing ring prefetches.
#ifndef MK_PHASE
#define MK_PHASE 0
#endif
#ifndef MK_MOEW
#define MK_MOEW 1  // MoE-up blocks shared among experts by cost (2: items over blocks by cost, 0: equally)
#endif
// MK_UNIQW (default 1 since s18r2, with MK_RTU = 32): moe_unique's member counts and lists by warp ballots (see
// there). s18r2 (H100, same call): T = 1 / 4 / 8 / 16 9.698 / 13.828 / 20.666 / 32.593 vs 9.721 / 13.867 / 20.752 /
// 33.282 ms.
#ifndef MK_UNIQW
#define MK_UNIQW 1
#endif
// MK_MOEST (default 1 since s18r1): MK_MOEW = 1's per-expert first blocks computed once by a thread per expert (see
// op_moe_up); same assignment. s18r1 (H100, one call): T = 1 / 16 9.705 / 32.464 ms vs 9.897 / 32.573 (MoE-up path
// at T = 1 3063 -> 2893 us).
#ifndef MK_MOEST
#define MK_MOEST 1
#endif
#define MK_CW (MK_WARPS - 1)  // consumer warps; the last warp is the producer

__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Diagnostics (variant cubins only; results are wrong): MK_NOCOMPUTE=1 consumers skip the MMA steps (the ring's
// own rate), MK_NOCOPY=1 the producer completes each slot without copying (the consumers' own rate).
// MK_F8PF (default 1 since s17r2, part of v19): the FP8 block scales of a warp's next K step are loaded during this
// one (global loads that miss L1 at each new scale line: s17r1 ncu, the FP8 step loop's top stall, long scoreboard
// 11 % of its samples); 0: loaded in the step that uses them.
#ifndef MK_F8PF
#define MK_F8PF 1
#endif
#ifndef MK_NOCOMPUTE
#define MK_NOCOMPUTE 0
#endif
#ifndef MK_NOCOPY
#define MK_NOCOPY 0
#endif
// MK_TMAP: ring chunks whose 16-row halves are consecutive weight rows are filled by TMA tensor copies (1: one
// 3-D box per half, 2: eight 2-D boxes per half) into a 128-byte-swizzled layout instead of one bulk copy per row
// segment (s9r2: the bulk-copy ring streams ~17 GB/s per SM with 32-64 copies a chunk, ~28 with 1-4); 0: off.
#ifndef MK_TMAP
#define MK_TMAP 0
#endif
// MK_LDGSTS=1: the producer warp fills ring slots with 16-byte cp.async (LDGSTS) instead of one bulk copy per row
// segment: the s9r2 diagnostics put the bulk-copy ring at ~17 GB/s per SM with 32-64 copies a chunk, ~28 with 1-4.
#ifndef MK_LDGSTS
#define MK_LDGSTS 0
#endif
// MK_TMPF=D (with MK_TMAP): after a tensor-copied chunk, prefetch into L2 the chunk D ahead in the call, assuming
// its halves continue the same consecutive rows (a wrong guess only wastes the hint): bytes in flight beyond the
// three ring slots. 0: off.
#ifndef MK_TMPF
#define MK_TMPF 0
#endif
#if MK_LDGSTS && MK_TMAP
#error "MK_LDGSTS counts 32 arrivals on a full barrier that tensor-copied chunks arrive on once: build one or the other"
#endif
// MK_ONECOPY=N: the producer fills each slot with N bulk copies from a synthetic range (with MK_NOCOMPUTE: what
// the ring streams with few large copies instead of one per row and segment).
#ifndef MK_ONECOPY
#define MK_ONECOPY 0
#endif
// MK_TILED=1 (v18, the default): ring chunks of FP8 / MXFP4 matrices the runtime tiled (mimo_tile) come as one or
// two bulk copies instead of one per row (s16r1, H100: issuing a chunk's 32 row copies took ~1.3 us, 4 us for the
// three chunks prefetched at an instruction's start); 0: row copies only.
#ifndef MK_TILED
#define MK_TILED 1
#endif
// MK_V23=1 (v23, session 23): MXFP4 ring calls stream 64-row x 512-byte chunks that consumer warps 0-3 take one
// 16-row tile each over the call's whole K (row ownership: no K split, no cross-warp sums, no group barrier);
// see "v23 row-owning MXFP4 ring" below. FP8 / bf16 calls keep v22's ring (same slots, same chunk counter).
#ifndef MK_V23
#define MK_V23 0
#endif
// MK_V23F8=KP (experiment knob, session 23; 0: off): FP8 ring calls keep v22's chunks (32 rows x 1 KB, same
// producer and slot layout) but 2 KP consumer warps take them: warp w owns 16-row tile w & 1 and the contiguous
// part w >> 1 of KP of every chunk's K steps, accumulating in registers over the row group; at the group's end the
// parts 1 .. KP - 1 leave their partials in a double buffer, one barrier of those warps, and part 0 adds them and
// writes the stage (v22: 7 warps dealt steps round robin over both tiles, 7 partials per row).
#ifndef MK_V23F8
#define MK_V23F8 0
#endif
// Consumers release a ring slot with one arrival per thread (MK_ARRIVE_ALL=1, the default) or per warp (lane 0,
// after __syncwarp orders the lanes' reads): the same ordering, but compute-sanitizer's racecheck follows only the
// per-thread form (it reports the per-warp one as WAR hazards, also on a minimal correct ring:
// tools/racecheck_repro.cu 'ring' vs 'ringall'); the two run at the same speed (s7r1).
#ifndef MK_ARRIVE_ALL
#define MK_ARRIVE_ALL 1
#endif
// Block barriers reconverge each warp first (MK_SYNCWARP=1): a warp that reaches a barrier with lanes still
// diverged after a lane-subset shared-memory write is, to racecheck, unordered with the readers past the barrier
// (RAW errors on correct code: tools/racecheck_repro.cu 'stage' vs 'stagesw'). Independent thread scheduling
// does not promise reconvergence at the end of a branch, so the __syncwarp is what makes the arrival whole.
#ifndef MK_SYNCWARP
#define MK_SYNCWARP 1
#endif
__device__ __forceinline__ void block_sync() {
  if (MK_SYNCWARP) __syncwarp();
#if MK_DEC
  asm volatile("bar.sync 1, %0;" ::"n"(MK_BT) : "memory");  // the consumer warps only (MK_DEC)
#else
  __syncthreads();
#endif
}
#define RING_NS 3
#define RING_ROWS 32
#define RING_SEG 1024
#define RING_PADMAX 64  // row pitch in a slot = RING_SEG + pad (MXFP4 16, FP8 32, bf16 64): conflict-free fragment loads
#define RING_SSTR 80    // MXFP4 scale-row pitch (64 scale bytes, padded so 8 rows fall in 8 banks)
#define RING_SLOT (((RING_ROWS * (RING_SEG + RING_PADMAX + RING_SSTR)) + 1023) & ~1023)  // 1 KB-aligned slots
#define RING_TSCALE_OFF 32768  // tensor-copied slots: MXFP4 scales after the 32 KB of weights
#define RING_SCALE_OFF (RING_ROWS * (RING_SEG + RING_PADMAX))
#define RED_TOK (((MK_MAX_T + 7) / 8) * 8)

extern __shared__ __align__(1024) float mk_smem[];            // dynamic: [ring | xs | stage | red | inv | iv | mmr]
__shared__ __align__(8) unsigned long long mk_bars[2 * RING_NS];  // full[RING_NS], empty[RING_NS]
__shared__ unsigned long long mk_stat[5];                     // ring profile counters (see ring_consume)
__shared__ int mk_prof_on;
__shared__ unsigned long long mk_tmark;  // MK_PHASE: start of the open phase interval (0: none)
#define PH_BEGIN(n) \
  if (MK_PHASE == (n) && mk_prof_on && threadIdx.x == 0) mk_tmark = gtimer();
#define PH_END(n)                                                               \
  if (MK_PHASE == (n) && mk_prof_on && threadIdx.x == 0 && mk_tmark != 0ull) { \
    mk_stat[4] += gtimer() - mk_tmark;                                          \
    mk_tmark = 0ull;                                                            \
  }
// The instruction every block is working on (published by the main loop; its `w` is where the tensor maps
// start).
__shared__ DInstr mk_cur;
#if MK_DEC
#if MK_TMAP || MK_LDGSTS || MK_ONECOPY || MK_MOEW != 1
#error "MK_DEC: the decoupled producer supports the default ring (no MK_TMAP / MK_LDGSTS / MK_ONECOPY) and MK_MOEW=1"
#endif
// The decoupled producer's own instruction (it runs ahead of the consumers' mk_cur), the routing lists it copies
// from SM_IV (U, then ids, member counts and member starts at PV_*), two mbarriers that hand those lists over
// (ivready: the consumers published them, one arrival; ivfree: the producer copied them, 32 arrivals) and the
// identity of each of its last 8 ring calls (c0, rows, k0, kc, low word of w, mode), which the consumers check.
__shared__ DInstr mk_pcur;
#define PV_IDS 8
#define PV_CNT 264
#define PV_MST 520
__shared__ int mk_piv[PV_MST + 264];
__shared__ __align__(8) unsigned long long mk_ivready;
__shared__ __align__(8) unsigned long long mk_ivfree;
__shared__ int mk_callid[8][6];
#define MK_PCUR mk_pcur
#else
#define MK_PCUR mk_cur
#endif
// Tensor copies (MK_TMAP): the current instruction's weight map (3-D with MK_TMAP=1, 2-D with 2) and MXFP4 scale
// map (null: none), and per ring slot whether tensor copies filled it.
__shared__ const uint8_t* mk_tmw;
__shared__ const uint8_t* mk_tms;
__shared__ unsigned char mk_slay[RING_NS];
__shared__ int mk_tmfence;  // the producer acquired this instruction's maps (reset per instruction)
// Pre-tiled weights of the current instruction (v18, see mimo_tile / ring_produce): tiled weights and MXFP4 scales
// (null: none) and the tiled tensor's 16-row block count.
__shared__ const uint8_t* mk_tw;
__shared__ const uint8_t* mk_tsc;
__shared__ long long mk_tnb;
__shared__ int mk_flags[4];  // [0]: activations resident in xs; [1]: SM_IV holds this routing buffer's lists; [2]: last attention split

// Shared memory: the weight ring first, then the activation rows, the tile stage, reductions, norm factors, the
// routing lists and the consumer warps' partial sums, all at compile-time offsets of the dynamic shared memory.
#define SM_XS (mk_smem + RING_NS * RING_SLOT / 4)
#define SM_STAGE (SM_XS + MK_XS)
#define SM_RED (SM_STAGE + MK_STAGE)
#define SM_INV (SM_RED + MK_THREADS)
#define SM_IV (reinterpret_cast<int*>(SM_INV + MK_MAX_T))
#define IV_LEN 1600
#define SM_MMR (reinterpret_cast<float*>(SM_IV + IV_LEN))  // [2][MK_CW][32][8] or [MK_CW][16][RED_TOK] partials

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, unsigned int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// n arrivals at once (v23: one thread arriving for the warps that skip a ring call).
__device__ __forceinline__ void mbar_arrive_n(unsigned long long* bar, unsigned int n) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(n) : "memory");
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
// Acquire a tensor map in global memory for the tensor proxy (it was written through the generic proxy).
__device__ __forceinline__ void tmap_acquire(const uint8_t* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(map) : "memory");
}
// L2 prefetches of one box through a tensor map (a hint: out-of-range boxes are harmless).
__device__ __forceinline__ void tma_pf2d(const uint8_t* map, int x0, int x1) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(map), "r"(x0), "r"(x1) : "memory");
}
__device__ __forceinline__ void tma_pf3d(const uint8_t* map, int x0, int x1, int x2) {
  asm volatile("cp.async.bulk.prefetch.tensor.3d.L2.global.tile [%0, {%1, %2, %3}];" ::"l"(map), "r"(x0), "r"(x1),
               "r"(x2)
               : "memory");
}
// TMA tensor copies of one box into shared memory (coordinates innermost first), completing on bar.
__device__ __forceinline__ void tma2d(void* dst, const uint8_t* map, int x0, int x1, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_u32(dst)),
      "l"(map), "r"(x0), "r"(x1), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma3d(void* dst, const uint8_t* map, int x0, int x1, int x2, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          smem_u32(dst)),
      "l"(map), "r"(x0), "r"(x1), "r"(x2), "r"(smem_u32(bar))
      : "memory");
}
// Barrier of the consumer warps only (the producer keeps streaming): an mbarrier the consumers arrive on, each
// then waiting for the phase of its own arrival (MK_CBAR=1, the default), or named barrier 1 (MK_CBAR=0). Same
// speed (s7r4); racecheck mis-orders block barriers that follow a named one (RAW errors on correct code:
// tools/racecheck_repro.cu 'stage' vs 'stagenb') and reports 0 hazards with the mbarrier (s7r4).
#ifndef MK_CBAR
#define MK_CBAR 1
#endif
__shared__ __align__(8) unsigned long long mk_cbar;
// The mbarrier form: each thread arrives on mk_cbar (MK_CW * 32 arrivals a phase; thread 0 also arrives `extra`
// times, for warps that do not take part) and waits for the phase of its own arrival.
__device__ __forceinline__ void cbar_sync(unsigned int extra) {
  unsigned long long st;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];" : "=l"(st) : "r"(smem_u32(&mk_cbar)) : "memory");
  if (extra > 0 && threadIdx.x == 0) mbar_arrive_n(&mk_cbar, extra);
  asm volatile(
      "{\n .reg .pred P1;\n"
      "CB_%=:\n"
      " mbarrier.try_wait.shared::cta.b64 P1, [%0], %1;\n"
      " @!P1 bra CB_%=;\n"
      "}\n" ::"r"(smem_u32(&mk_cbar)),
      "l"(st)
      : "memory");
}
__device__ __forceinline__ void consumers_sync() {
  if (MK_SYNCWARP) __syncwarp();
#if MK_CBAR
  cbar_sync(0);
#else
  asm volatile("bar.sync 1, %0;" ::"n"(MK_CW * 32) : "memory");
#endif
}

// Elements <-> bytes of a weight format.
template <int FMT> __device__ __forceinline__ int el_bytes(int el) {
  return FMT == FMT_BF16 ? el * 2 : FMT == FMT_F8 ? el : el / 2;
}
// Bytes of one row per 32-element K step, and the row pitch inside a ring slot.
template <int FMT> struct RingFmt {
  static constexpr int SB = FMT == FMT_MXFP4 ? 16 : FMT == FMT_F8 ? 32 : 64;
  static constexpr int PITCH = RING_SEG + (FMT == FMT_MXFP4 ? 16 : FMT == FMT_F8 ? 32 : 64);
};

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
  o.rp = W; o.sp = W; o.n = 0; o.xl = -1; o.col = 0;
  int u;
  o.ok = row_out(d, r, nrows, o.col, o.n, o.xl, u);
  if (!o.ok) return o;
  if (d.mode == 2) {
    long long we, wse;
    expert_offsets(FMT, d.w, d.ws, sld(d.ids + u), d.erows, d.K, &we, &wse);
    o.rp = row_ptr<FMT>(W, we, d.c0 + o.col, d.K);
    o.sp = srow_ptr<FMT>(W, wse, d.c0 + o.col, d.K);
  } else {
    const int row = d.map(r);
    o.rp = row_ptr<FMT>(W, d.w, row, d.K);
    o.sp = srow_ptr<FMT>(W, d.ws, row, d.K);
  }
  return o;
}

// The output side of ring row r (ring_row without the weight pointers): false for rows past nrows or padding.

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
__device__ __forceinline__ uint2 lds64(unsigned int a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ uint4 lds128(unsigned int a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}

__device__ __forceinline__ unsigned int prmt(unsigned int a, unsigned int b, unsigned int s) {
  unsigned int d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}
__device__ __forceinline__ unsigned int pack_h2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned int*>(&h);
}
// D += A (16x16 f16, row) * B (16x8 f16, col), f32 accumulate.
__device__ __forceinline__ void mma_f16(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                        unsigned int a3, unsigned int b0, unsigned int b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One lane's 8 weights of a K step (elements 8t .. 8t + 7 of its row) as the f16x2 pairs (8t + q, 8t + q + 4).
#ifndef MK_FP4R
#define MK_FP4R 1
#endif
#if MK_FP4R
// MXFP4 in the device layout (`mimo_fp4_repack` rewrites every 32-bit word of the plan's MXFP4 weights once at
// load). An E2M1 code (s, e1, e0, m) placed at f16 bits (15, 11, 10, 9) with every other bit zero IS the f16 of
// its value times 2^-14 (e = 0: the subnormal m * 2^-15; e > 0: 2^(e - 15) (1 + m / 2)), so decoding is bit
// placement only, and the 2^14 goes into the E8M0 scale. The device layout puts each pair's two codes where one
// mask (pair 0), a shift (pair 1), one multiply (pair 2: two shifted copies at once) or the two halves of one
// 32 x 32 -> 64-bit multiply (pair 3: one half shifts left, the other right) leave them at those bits:
// 9 instructions per 8 weights, no table. Element e's (m, e0, e1, s) bits in the device word:
//   e0 9 10 11 15 | e1 1 2 3 7 | e2 0 4 5 6 | e3 24 28 29 30 | e4 25 26 27 31 | e5 17 18 19 23 | e6 16 20 21 22 |
//   e7 8 12 13 14
#define FP4_PAIR_MASK 0x8E008E00u
__device__ __forceinline__ void fp4_pairs(unsigned int w, unsigned int (&p)[4]) {
  p[0] = w & FP4_PAIR_MASK;
  p[1] = (w << 8) & FP4_PAIR_MASK;
  p[2] = ((w & 0x00710071u) * 0x240u) & FP4_PAIR_MASK;  // << 6 and << 9 at once (the copies do not overlap)
  const unsigned long long t = (unsigned long long)(w & 0x71007100u) * 0x24000u;  // << 14 and << 17
  p[3] = ((unsigned int)t | (unsigned int)(t >> 32)) & FP4_PAIR_MASK;
}
// The E8M0 scale times 2^14: 2^(e - 113), exact for e <= 240 (the repack rejects larger exponents).
__device__ __forceinline__ float fp4_scale(unsigned int b) { return __uint_as_float(b * 0x800000u + 0x7000000u); }
// Element e's four code bits (m, e0, e1, s) -> device-word bit positions, packed 5 bits each.
__constant__ unsigned int FP4_POS[8] = {
    9u | 10u << 5 | 11u << 10 | 15u << 15,  1u | 2u << 5 | 3u << 10 | 7u << 15,
    0u | 4u << 5 | 5u << 10 | 6u << 15,    24u | 28u << 5 | 29u << 10 | 30u << 15,
    25u | 26u << 5 | 27u << 10 | 31u << 15, 17u | 18u << 5 | 19u << 10 | 23u << 15,
    16u | 20u << 5 | 21u << 10 | 22u << 15, 8u | 12u << 5 | 13u << 10 | 14u << 15};
// One-time load transform of an MXFP4 weight region (OCP layout: element e of a word in nibble e) into the
// device layout above; flags (*bad = 1) any E8M0 scale byte above 240, whose 2^14-folded scale would overflow.
extern "C" __global__ void mimo_fp4_repack(unsigned int* w, unsigned long long nwords, const uint8_t* scales,
                                           unsigned long long nscales, unsigned int* bad) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < nwords; i += stride) {
    const unsigned int v = w[i];
    unsigned int r = 0;
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const unsigned int pos = FP4_POS[e];
#pragma unroll
      for (int b = 0; b < 4; b++) r |= ((v >> (4 * e + b)) & 1u) << ((pos >> (5 * b)) & 31u);
    }
    w[i] = r;
  }
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < nscales; i += stride)
    if (scales[i] > 240) atomicOr(bad, 1u);
}
#else
// MXFP4 (one word, element e in nibble e): the magnitudes index a register table of E2M1 values (f16 high
// bytes; the low bytes are zero) with one byte permute per four, a second permute places the pair, and the sign
// bits (which sit 16 apart, like the pair) are or-ed in.
// The table holds half of each E2M1 magnitude ({0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3}, exact in f16) and the
// E8M0 scale is taken doubled, 2^(e - 126) = float((e + 1) << 23): one IMAD instead of a compare and select for
// e = 0 (2^-127 is subnormal), and still exact for every e < 254 (254 would overflow to inf).
#define FP4_TAB0 0x3A383400u
#define FP4_TAB1 0x42403E3Cu
__device__ __forceinline__ float fp4_scale(unsigned int b) { return __uint_as_float(b * 0x800000u + 0x800000u); }
__device__ __forceinline__ void fp4_pairs(unsigned int w, unsigned int (&p)[4]) {
  const unsigned int m = w & 0x77777777u;
  const unsigned int r0 = prmt(FP4_TAB0, FP4_TAB1, m);        // |e0..e3| as f16 high bytes
  const unsigned int r1 = prmt(FP4_TAB0, FP4_TAB1, m >> 16);  // |e4..e7|
  p[0] = prmt(r0, r1, 0x4808u) | ((w << 12) & 0x80008000u);
  p[1] = prmt(r0, r1, 0x5818u) | ((w << 8) & 0x80008000u);
  p[2] = prmt(r0, r1, 0x6828u) | ((w << 4) & 0x80008000u);
  p[3] = prmt(r0, r1, 0x7838u) | (w & 0x80008000u);
}
#endif
// v18 pre-tiled copy of a ring-streamed matrix (rows x rb bytes) for one-copy ring chunks (see ring_produce):
// [16-row block pair p < ceil(nb / 2)][segment sg < nsg][block b & 1][row r < 16][pitch bytes] (block b: rows
// 16 b .. 16 b + 15), where segment sg of a row is its bytes [sg seg, sg seg + seg), the rest of the pitch (the
// slot's padding) and rows past `rows` zero: a 32-row chunk is one contiguous pair, a row group's K one run. The runtime tiles
// each FP8 / MXFP4 matrix's weights (seg = min(RING_SEG, rb), pitch = RingFmt PITCH) and MXFP4 scales (seg / 16
// scale bytes a segment, pitch RING_SSTR) once at load, after mimo_fp4_repack.
//
// pitch = -U (v23, MXFP4 under MK_V23): the step-major copy instead, [16-row block quad q < ceil(nb / 4)][segment
// sg < nsg][block b & 3][step st < seg / U][row r < 16][U bytes] (U = 16: the weights' 32-element steps; U = 1:
// their scale bytes), steps past the row and rows past `rows` zero: a 64-row v23 chunk of consecutive aligned
// blocks is one contiguous run (see ring_produce23).
extern "C" __global__ void mimo_tile(const uint8_t* src, uint8_t* dst, long long rows, int rb, int seg, int pitch,
                                     int nsg, long long nb) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  if (pitch < 0) {
    const int U = -pitch;
    const bool vec = U == 16 && ((rb | seg) & 15) == 0 && (((unsigned long long)src | (unsigned long long)dst) & 15) == 0;
    const int w = vec ? 16 : 1;
    const unsigned long long blk = 16ull * (unsigned long long)seg / w;  // units of a block
    const unsigned long long total = (unsigned long long)((nb + 3) / 4) * 4ull * (unsigned long long)nsg * blk;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total; i += stride) {
      const unsigned long long o = (i % blk) * w, bi = i / blk;  // byte o of block bi = ((q nsg) + sg) 4 + (b & 3)
      const long long b = (long long)((bi / (4ull * nsg)) * 4ull + (bi & 3ull));
      const long long sg = (long long)((bi >> 2) % (unsigned long long)nsg);
      const long long st = (long long)(o / (16ull * U)), rem = (long long)(o % (16ull * U));
      const long long row = b * 16 + rem / U, col = st * U + rem % U, off = sg * seg + col;
      const bool in = row < rows && col < seg && off < rb;
      if (vec) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (in) v = *reinterpret_cast<const uint4*>(src + row * rb + off);
        reinterpret_cast<uint4*>(dst)[i] = v;
      } else {
        dst[i] = in ? src[row * rb + off] : (uint8_t)0;
      }
    }
    return;
  }
  const bool vec = ((rb | seg | pitch) & 15) == 0 && (((unsigned long long)src | (unsigned long long)dst) & 15) == 0;
  const int w = vec ? 16 : 1, upr = pitch / w;
  const unsigned long long npair = (unsigned long long)(nb + 1) / 2;
  const unsigned long long total = npair * (unsigned long long)nsg * 32ull * (unsigned long long)upr;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total; i += stride) {
    const int u = (int)(i % (unsigned long long)upr);
    const unsigned long long t = i / (unsigned long long)upr;
    const int r = (int)(t & 15ull), b2 = (int)((t >> 4) & 1ull);
    const unsigned long long ps = t >> 5;
    const long long sg = (long long)(ps % (unsigned long long)nsg), pr = (long long)(ps / (unsigned long long)nsg);
    const long long row = (2 * (long long)pr + b2) * 16 + r, col = (long long)u * w, off = sg * seg + col;
    const bool in = row < rows && col < seg && off < rb;
    if (vec) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (in) v = *reinterpret_cast<const uint4*>(src + row * rb + off);
      reinterpret_cast<uint4*>(dst)[i] = v;
    } else {
      dst[i] = in ? src[row * rb + off] : (uint8_t)0;
    }
  }
}
__device__ __forceinline__ unsigned int e4m3x2_h2(unsigned int v) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xffffu), __NV_E4M3);
  return (unsigned int)h.x | ((unsigned int)h.y << 16);
}
// FP8 (two words, bytes b0..b7): bytes regrouped (b0, b4, b1, b5), (b2, b6, b3, b7), then converted by pairs.
__device__ __forceinline__ void fp8_pairs(uint2 w, unsigned int (&p)[4]) {
  const unsigned int q0 = prmt(w.x, w.y, 0x5140u), q1 = prmt(w.x, w.y, 0x7362u);
  p[0] = e4m3x2_h2(q0);
  p[1] = e4m3x2_h2(q0 >> 16);
  p[2] = e4m3x2_h2(q1);
  p[3] = e4m3x2_h2(q1 >> 16);
}
// bf16 (four words): exact in f32, rounded to f16 (exact for |w| in [2^-14, 65504]).
__device__ __forceinline__ void bf16_pairs(uint4 w, unsigned int (&p)[4]) {
  p[0] = pack_h2(bf16lo(w.x), bf16lo(w.z));
  p[1] = pack_h2(bf16hi(w.x), bf16hi(w.z));
  p[2] = pack_h2(bf16lo(w.y), bf16lo(w.w));
  p[3] = pack_h2(bf16hi(w.y), bf16hi(w.w));
}

// Eight activations x[8t .. 8t + 7] of a 32-element step as B fragments: hi pairs (8t + q, 8t + q + 4) in h, the
// rounding residues (lo) in l; hi + lo carries ~22 bits of each float.
__device__ __forceinline__ void frag8(const float (&v)[8], uint4& h, uint4& l) {
  unsigned int hh[4], ll[4];
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const __half2 a = __floats2half2_rn(v[q], v[q + 4]);
    const float2 back = __half22float2(a);
    hh[q] = *reinterpret_cast<const unsigned int*>(&a);
    ll[q] = pack_h2(v[q] - back.x, v[q + 4] - back.y);
  }
  h = make_uint4(hh[0], hh[1], hh[2], hh[3]);
  l = make_uint4(ll[0], ll[1], ll[2], ll[3]);
}
// MK_XSWZ (default 1 since s15r1: T = 16 36.74 vs 36.88 ms alone, part of v17; 0: no swizzle): in B-fragment
// rows, odd rows store each unit's lo half first. The consumers' LDS.128 of activations put two rows in each
// quarter-warp phase (lanes 4g .. 4g + 3 read row g at 32-byte steps); rows a multiple of 128 bytes apart (every K
// chunk width) then hit the same banks, and the swap moves the odd row to the other 16 bytes of each 32 (s13r3,
// T = 16: 39 % of all shared wavefronts were excess ones).
#ifndef MK_XSWZ
#define MK_XSWZ 1
#endif
// Byte offset of the hi half of a B-fragment unit in activation row j (its lo half: the other 16 bytes).
__device__ __forceinline__ unsigned int frag_hi(int j) { return MK_XSWZ ? 16u * ((unsigned int)j & 1u) : 0u; }
// Store eight floats at dst (32-byte aligned) as they are, or as B fragments (see frag8) of activation row j.
__device__ __forceinline__ void store8(float* dst, const float (&v)[8], bool frag, int j) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  if (frag) {
    uint4 h, l;
    frag8(v, h, l);
    const bool sw = frag_hi(j) != 0u;
    d[0] = sw ? l : h;
    d[1] = sw ? h : l;
  } else {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// The fused RMSNorm of eight activations: x *= f * g, f the row's 1 / rms, g0 / g1 the columns' norm weights.
__device__ __forceinline__ void scale8(float (&x)[8], float f, float4 g0, float4 g1) {
  const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
  for (int e = 0; e < 8; e++) x[e] *= f * g[e];
}

// Rewrite activation rows (nrows x width floats at xstride, width a multiple of 32) in place into B fragments
// (the loaders write fragments directly; this serves their unaligned fallbacks).
__device__ __noinline__ void xs_frag(float* xs, int nrows, int xstride, int width) {
  const int per = width / 8;
  for (int i = threadIdx.x; i < nrows * per; i += MK_BT) {
    const int j = i / per, c = i - j * per;
    float* p = xs + j * xstride + 8 * c;
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    store8(p, v, true, j);
  }
}

struct Smem {
  unsigned int ring_it;  // chunks this block has streamed through the weight ring so far (same on every thread)
  // Producer warp only: chunks of the block's next ring call already issued ahead of it (see prefetch_matmul),
  // and that call's identity (checked when it comes).
  int pre, pre_c0, pre_rows, pre_kc, pre_k0;
  long long pre_w;
#if MK_DEC
  int ncall;  // ring calls with chunks so far (index of the producer's identity record, mk_callid)
  int npub;   // routing lists published to the producer so far (mk_ivready / mk_ivfree phases)
#endif
};

// Producer: lane i copies ring row i of each chunk of stage[out(r, j)] += dot(W[row(r)], x[j]) over
// k in [k0, k0 + kc) for r < nrows.
// MXFP4 scales travel with the weights when every copy is 16-byte sized and aligned.
template <int FMT>
__device__ __forceinline__ bool ring_sring(const TileRows& d, int k0, int kc) {
  return FMT == FMT_MXFP4 && ((d.K / 32) & 15) == 0 && (d.ws & 15) == 0 && (el_bytes<FMT>(kc) & 255) == 0 &&
         (k0 & 511) == 0;
}

#if MK_TMAP
// The tensor copies of one ring chunk: per 16-row half starting at weight row rowh[h] + dr (< 0: no half), K byte
// offset boff, its weights (one 3-D box, or eight 2-D boxes with MK_TMAP=2) and, with a scale map, its MXFP4
// scales from scale column scol, into the slot at dst completing on bar; dst null: L2 prefetches of the same boxes.
__device__ __forceinline__ void tma_chunk(uint8_t* dst, unsigned long long* bar, const uint8_t* tmw,
                                          const uint8_t* tms, const int (&rowh)[2], int dr, int boff, int scol) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    if (rowh[h] < 0) continue;
    const int row = rowh[h] + dr;
#if MK_TMAP == 2
#pragma unroll
    for (int j = 0; j < 8; j++) {
      if (dst) tma2d(dst + h * 16384 + j * 2048, tmw + 128, boff + j * 128, row, bar);
      else tma_pf2d(tmw + 128, boff + j * 128, row);
    }
#else
    if (dst) tma3d(dst + h * 16384, tmw, 0, row, boff >> 7, bar);
    else tma_pf3d(tmw, 0, row, boff >> 7);
#endif
    if (tms) {
      if (dst) tma2d(dst + RING_TSCALE_OFF + h * 1024, tms, scol, row, bar);
      else tma_pf2d(tms, scol, row);
    }
  }
}
#endif

// Half h (16 rows) of a ring chunk whose lanes hold row pointers rp (valid: ok, the warp's mask okm): its valid-row
// mask, its first row's address, and whether its valid rows are a prefix of the half holding consecutive weight rows
// (what one tiled or tensor copy can fetch whole). Warp-collective.
struct HalfRun {
  unsigned int hm;
  const uint8_t* r0;
  bool whole;
};
__device__ __forceinline__ HalfRun half_run(const uint8_t* rp, bool ok, unsigned int okm, int h, int lane,
                                            int rowbytes) {
  HalfRun o;
  o.hm = (okm >> (16 * h)) & 0xffffu;
  o.r0 = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, (unsigned long long)rp, 16 * h));
  o.whole = __all_sync(0xffffffffu, (lane >> 4) != h || !ok || rp == o.r0 + (long long)(lane - 16 * h) * rowbytes) &&
            (o.hm & (o.hm + 1)) == 0;
  return o;
}

// The pre-tiled 16-row blocks (see mimo_tile) of a ring row group whose lanes hold row pointers rp (valid: ok):
// per half, its block index when its valid rows are a prefix of one 16-aligned run of consecutive rows of the
// current instruction's tiled tensor, else -1. Warp-collective.
__device__ __forceinline__ void half_blocks(const uint8_t* W, const uint8_t* rp, bool ok, int lane, int rowbytes,
                                            long long (&tb)[2]) {
  const unsigned int okm = __ballot_sync(0xffffffffu, ok);
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const HalfRun hr = half_run(rp, ok, okm, h, lane, rowbytes);
    tb[h] = -1;
    if (hr.hm != 0 && hr.whole) {
      const long long off = (long long)(hr.r0 - (W + MK_PCUR.w));
      const long long rr = off / rowbytes;
      if (off >= 0 && rr * rowbytes == off && (rr & 15) == 0 && rr / 16 < mk_tnb) tb[h] = rr / 16;
    }
  }
}
#ifndef MK_L2PF
#define MK_L2PF 0
#endif
// L2 prefetch of a byte range (16-byte aligned and sized; a hint).
__device__ __forceinline__ void bulk_pf_l2(const void* src, unsigned int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// Issues chunks [cb, ce) of the call (clamped to its chunk count) and returns how many it issued.
template <int FMT>
__device__ __noinline__ int ring_produce(const uint8_t* W, const TileRows& d, int k0, int kc, int nrows,
                                         unsigned int it, int cb, int ce) {
  constexpr int PITCH = RingFmt<FMT>::PITCH;
  const bool sring = ring_sring<FMT>(d, k0, kc);
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  uint8_t* const rbuf = reinterpret_cast<uint8_t*>(mk_smem);
  unsigned long long* const stat = mk_prof_on ? mk_stat : nullptr;
  const int lane = threadIdx.x & 31;
  const int kbytes = el_bytes<FMT>(kc);
  const int seg = min(RING_SEG, kbytes);
  const int nseg = (kbytes + seg - 1) / seg;
  const int segel = FMT == FMT_BF16 ? seg / 2 : FMT == FMT_F8 ? seg : seg * 2;
  const int nchunks = ((nrows + RING_ROWS - 1) / RING_ROWS) * nseg;
  const int kb0 = el_bytes<FMT>(k0);
  const long long tstart = clock64();
  long long twait = 0;
  const uint8_t* rp = W;
  const uint8_t* sp = W;
  bool ok = false;
#if MK_TMAP
  const uint8_t* const tmw = mk_tmw;
  const uint8_t* const tms = mk_tms;
  bool tg = false;  // (rowbytes, below, serves the tensor copies too)
  int rowh[2] = {-1, -1};
#endif
  ce = min(ce, nchunks);
  // v18 pre-tiled weights (mimo_tile): a chunk whose K range is one tiled segment takes each 16-row half that is
  // a 16-aligned run of consecutive tensor rows (a prefix of them valid) as one bulk copy of the tiled block (one
  // copy for both halves when the blocks are adjacent), MXFP4 scales likewise; other halves copy row by row.
  const uint8_t* const tw = mk_tw;
  const int rowbytes = el_bytes<FMT>(d.K);
  const bool tcall = MK_TILED && tw != nullptr && (FMT == FMT_F8 || (FMT == FMT_MXFP4 && sring && mk_tsc != nullptr)) &&
                     (kb0 % RING_SEG) == 0 && seg == min(RING_SEG, rowbytes);
  long long tb[2] = {-1, -1};
  for (int c = cb; c < ce; c++) {
    const int g = (int)((unsigned)c / (unsigned)nseg), sg = c - g * nseg;
    const unsigned int u = it + c;
    const int slot = u % RING_NS;
    if (sg == 0 || c == cb) {
      const RowInfo ri = ring_row<FMT>(W, d, g * RING_ROWS + lane, nrows);
      rp = ri.rp; sp = ri.sp; ok = ri.ok;
      if (tcall) half_blocks(W, rp, ok, lane, rowbytes, tb);
#if MK_L2PF
      // MK_L2PF=D: the whole K range of row group g + D of the call (one tiled block pair) into L2 ahead of the
      // ring, so that the ring refills from L2 after the consumers' non-ring phases.
      if (tcall && sg == 0 && (g + MK_L2PF) * RING_ROWS < nrows) {
        const RowInfo rn = ring_row<FMT>(W, d, (g + MK_L2PF) * RING_ROWS + lane, nrows);
        long long tn[2];
        half_blocks(W, rn.rp, rn.ok, lane, rowbytes, tn);
        if (lane == 0 && tn[0] >= 0 && (tn[0] & 1) == 0 && tn[1] == tn[0] + 1) {
          const long long nsg = (rowbytes + RING_SEG - 1) / RING_SEG;
          const long long at = ((tn[0] >> 1) * nsg + kb0 / RING_SEG) * 2;  // the pair's first block, this K
          bulk_pf_l2(tw + at * (16 * PITCH), (unsigned int)nseg * 2u * (16u * PITCH));
          if (sring) bulk_pf_l2(mk_tsc + at * (16 * RING_SSTR), (unsigned int)nseg * 2u * (16u * RING_SSTR));
        }
      }
#endif
#if MK_TMAP
      // Tensor copies need each 16-row half's valid rows to be a prefix of consecutive weight rows of the mapped
      // matrix. FP8: the half starts on a multiple of 8 and holds 8 or 16 valid rows, so fragment row gq, whose
      // block-scale pointer the consumers take, and the permuted row pr they compute are both valid and share
      // their 128-row scale block.
      tg = tmw != nullptr && (!sring || tms != nullptr);
      const unsigned int okm = __ballot_sync(0xffffffffu, ok);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const HalfRun hr = half_run(rp, ok, okm, h, lane, rowbytes);
        rowh[h] = -1;
        if (hr.hm != 0) {
          const long long rr = (long long)(hr.r0 - (W + MK_PCUR.w)) / rowbytes;
          rowh[h] = (int)rr;
          if (!hr.whole || rr < 0 || rr > 0x7fffffffLL ||
              (FMT == FMT_F8 && ((rr & 7) != 0 || (hr.hm != 0xffu && hr.hm != 0xffffu))))
            tg = false;
        }
      }
      if (okm == 0) tg = false;
#endif
    }
    if (u >= RING_NS) {
      const long long t0 = clock64();
      mbar_wait(empty + slot, ((u / RING_NS) - 1) & 1);
      twait += clock64() - t0;
    }
    const int bytes = min(seg, kbytes - sg * seg);
    const int sbytes = sring ? bytes / 16 : 0;
    const unsigned int cnt = __popc(__ballot_sync(0xffffffffu, ok));
#if MK_TMAP
    const int boff = kb0 + sg * seg;
    if (tg && (boff & 127) == 0) {
      if (lane == 0) {
        // The maps were written by the host (a copy before the launch): acquire them for the tensor proxy once per
        // instruction, in the thread that issues the copies.
        if (!mk_tmfence) {
          tmap_acquire(tmw);
          if (MK_TMAP == 2) tmap_acquire(tmw + 128);
          if (sring) tmap_acquire(tms);
          mk_tmfence = 1;
        }
        mk_slay[slot] = 1;
        unsigned int tx = 0;
#pragma unroll
        for (int h = 0; h < 2; h++)
          if (rowh[h] >= 0) tx += 16384u + (sring ? 1024u : 0u);
        mbar_arrive_expect(full + slot, tx);
        tma_chunk(rbuf + slot * RING_SLOT, full + slot, tmw, sring ? tms : nullptr, rowh, 0, boff,
                  (k0 + sg * segel) / 32);
#if MK_TMPF
        if (c + MK_TMPF < nchunks) {
          const int cpf = c + MK_TMPF, gp = cpf / nseg, sgp = cpf - gp * nseg;
          const int bp = kb0 + sgp * seg;
          if ((bp & 127) == 0)
            tma_chunk(nullptr, nullptr, tmw, sring ? tms : nullptr, rowh, (gp - g) * RING_ROWS, bp,
                      (k0 + sgp * segel) / 32);
        }
#endif
      }
      __syncwarp();
      continue;
    }
    if (lane == 0) mk_slay[slot] = 0;
#endif
#if MK_ONECOPY
    {  // diagnostic: the chunk's bytes in MK_ONECOPY bulk copies from a synthetic 256 MB range
      const unsigned int tot = cnt * (bytes + sbytes), per = ((tot / MK_ONECOPY) + 15) & ~15u;
      if (lane == 0) mbar_arrive_expect(full + slot, per * MK_ONECOPY);
      __syncwarp();
      const uint8_t* src = W + (unsigned long long)((u * 131u + blockIdx.x * 977u) % 8192u) * 32768ull;
      if (lane < MK_ONECOPY && per > 0) bulk_g2s(rbuf + slot * RING_SLOT + lane * per, src + lane * per, per, full + slot);
      continue;
    }
#endif
#if MK_LDGSTS
    // The warp copies the chunk with 16-byte cp.async: each instruction takes 32 consecutive 16-byte units of the
    // chunk's rows (half a 1 KB row segment, coalesced), then every lane's arrival on the full barrier fires when
    // its own copies have landed (noinc: the barrier counts the 32 lanes).
    {
      (void)cnt;
      const unsigned int okm = __ballot_sync(0xffffffffu, ok);
      const int nu = bytes >> 4, snu = sbytes >> 4;
      const uint8_t* src = rp + kb0 + sg * seg;
      const uint8_t* ssrc = sp + (k0 + sg * segel) / 32;
      const unsigned int dst = smem_u32(rbuf + slot * RING_SLOT);
      if ((nu & 31) == 0) {  // whole 512-byte runs: the row is warp-uniform
        for (int r = 0; r < RING_ROWS; r++) {
          const uint8_t* rs = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, (unsigned long long)src, r));
          if ((okm >> r) & 1u)
            for (int uu = lane; uu < nu; uu += 32)
              asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + r * PITCH + uu * 16),
                           "l"(rs + uu * 16)
                           : "memory");
        }
      } else {
        for (int f = lane; f < RING_ROWS * nu; f += 32) {
          const int r = f / nu, uu = f - r * nu;
          const uint8_t* rs = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, (unsigned long long)src, r));
          if ((okm >> r) & 1u)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + r * PITCH + uu * 16),
                         "l"(rs + uu * 16)
                         : "memory");
        }
      }
      if (sring) {
        for (int f = lane; f < RING_ROWS * snu; f += 32) {
          const int r = f / snu, uu = f - r * snu;
          const uint8_t* rs = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, (unsigned long long)ssrc, r));
          if ((okm >> r) & 1u)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + RING_SCALE_OFF + r * RING_SSTR + uu * 16),
                         "l"(rs + uu * 16)
                         : "memory");
        }
      }
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(full + slot)) : "memory");
      continue;
    }
#endif
    if (!MK_NOCOPY && tcall && (tb[0] >= 0 || tb[1] >= 0) &&
        bytes == min(RING_SEG, rowbytes - (kb0 + sg * seg))) {
      const long long sgg = (kb0 + sg * seg) / RING_SEG, nsg = (rowbytes + RING_SEG - 1) / RING_SEG;
      const bool merged = tb[0] >= 0 && (tb[0] & 1) == 0 && tb[1] == tb[0] + 1;  // one block pair
      const bool rowcp = ok && ((lane >> 4) ? tb[1] : tb[0]) < 0;  // lanes of a half without a tiled block copy their rows
      const unsigned int rcnt = __popc(__ballot_sync(0xffffffffu, rowcp));
      constexpr unsigned int HW = 16 * PITCH, HS = 16 * RING_SSTR;
      const unsigned int hb = HW + (sring ? HS : 0u);
      if (lane == 0)
        mbar_arrive_expect(full + slot, rcnt * (bytes + sbytes) + (tb[0] >= 0 ? hb : 0u) + (tb[1] >= 0 ? hb : 0u));
      __syncwarp();
      if ((lane == 0 || lane == 16) && !(lane == 16 && merged)) {
        const int h = lane >> 4;
        const long long b = h ? tb[1] : tb[0];
        if (b >= 0) {
          const unsigned int n = merged ? 2u : 1u;
          const long long at = (((b >> 1) * nsg + sgg) * 2 + (b & 1));  // block index in the tiled layout
          bulk_g2s(rbuf + slot * RING_SLOT + h * HW, tw + at * HW, n * HW, full + slot);
          if (sring)
            bulk_g2s(rbuf + slot * RING_SLOT + RING_SCALE_OFF + h * HS, mk_tsc + at * HS, n * HS, full + slot);
        }
      }
      if (rowcp) {
        bulk_g2s(rbuf + slot * RING_SLOT + lane * PITCH, rp + kb0 + sg * seg, bytes, full + slot);
        if (sring)
          bulk_g2s(rbuf + slot * RING_SLOT + RING_SCALE_OFF + lane * RING_SSTR, sp + (k0 + sg * segel) / 32, sbytes,
                   full + slot);
      }
      continue;
    }
    if (lane == 0) mbar_arrive_expect(full + slot, cnt * (bytes + sbytes));
    __syncwarp();
    if (MK_NOCOPY) {  // diagnostic: the consumers' rate alone (they compute on whatever the slot holds)
      if (lane == 0) asm volatile("mbarrier.complete_tx.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(full + slot)),
                                  "r"(cnt * (bytes + sbytes)) : "memory");
    } else if (ok) {
      bulk_g2s(rbuf + slot * RING_SLOT + lane * PITCH, rp + kb0 + sg * seg, bytes, full + slot);
      if (sring)
        bulk_g2s(rbuf + slot * RING_SLOT + RING_SCALE_OFF + lane * RING_SSTR, sp + (k0 + sg * segel) / 32, sbytes,
                 full + slot);
    }
  }
  if (stat && lane == 0) {
    stat[2] += twait;
    stat[3] += clock64() - tstart;
  }
  return max(0, ce - cb);
}

// One lane's share of K step ks of a chunk for both row tiles: the weights of rows gq and gq + 8 decoded to f16
// pairs (pa: row gq, pb: row gq + 8) and their scales (sa, sb).
// TL: the slot was filled by tensor copies: [half][kunit of 128 B][16 rows][128 B], the 16-byte units of each
// 128-byte line XOR-swizzled by the row's low 3 bits (TMA 128B swizzle), MXFP4 scales [half][16 rows][64 B]
// (64B swizzle); wb / sb already hold the lane's row (pr, see ring_consume) and in-unit offset, pr and tsel the
// XOR key and the lane's low unit bits.
template <int FMT, bool SRING, bool TL>
__device__ __forceinline__ void step_weights(unsigned int wb, unsigned int sb, unsigned int pr, unsigned int tsel,
                                             const uint8_t* const (&spr)[2][2], int k0, int kk, int ks,
                                             unsigned int (&pa)[2][4], unsigned int (&pb)[2][4], float (&sa)[2],
                                             float (&sbv)[2]) {
  constexpr int SB = RingFmt<FMT>::SB;
  constexpr int PITCH = RingFmt<FMT>::PITCH;
  const unsigned int u = (unsigned int)ks;
#pragma unroll
  for (int rt = 0; rt < 2; rt++) {
    unsigned int wa;
    if (TL) {
      const unsigned int kun = FMT == FMT_MXFP4 ? u >> 3 : FMT == FMT_F8 ? u >> 2 : u >> 1;
      const unsigned int unit = FMT == FMT_MXFP4 ? (u & 7u) : FMT == FMT_F8 ? (((u & 3u) << 1) | tsel) : (((u & 1u) << 2) | tsel);
      wa = wb + rt * 16384 + kun * 2048 + ((unit ^ pr) << 4);
    } else {
      wa = wb + (rt * 16) * PITCH + ks * SB;
    }
    const unsigned int r8 = TL ? 1024u : 8u * PITCH;  // row + 8
    if (FMT == FMT_MXFP4) {
      fp4_pairs(lds32(wa), pa[rt]);
      fp4_pairs(lds32(wa + r8), pb[rt]);
      if (SRING) {
        const unsigned int sr = TL ? sb + rt * 1024 + ((((u >> 4) ^ ((pr >> 1) & 3u)) << 4) | (u & 15u))
                                   : sb + (rt * 16) * RING_SSTR + ks;
        sa[rt] = fp4_scale(lds8(sr));
        sbv[rt] = fp4_scale(lds8(sr + (TL ? 512u : 8u * RING_SSTR)));
      } else {
        sa[rt] = fp4_scale(__ldg(spr[rt][0] + (k0 + kk) / 32));
        sbv[rt] = fp4_scale(__ldg(spr[rt][1] + (k0 + kk) / 32));
      }
    } else if (FMT == FMT_F8) {
      fp8_pairs(lds64(wa), pa[rt]);
      fp8_pairs(lds64(wa + r8), pb[rt]);
      if (!MK_F8PF) {  // else the caller loaded them a step ahead (f8_scales)
        sa[rt] = __ldg(reinterpret_cast<const float*>(spr[rt][0]) + (k0 + kk) / 128);
        sbv[rt] = __ldg(reinterpret_cast<const float*>(spr[rt][1]) + (k0 + kk) / 128);
      }
    } else {
      bf16_pairs(lds128(wa), pa[rt]);
      bf16_pairs(lds128(wa + r8), pb[rt]);
      sa[rt] = 1.f;
      sbv[rt] = 1.f;
    }
  }
}

// MK_HILO=0 (diagnostic): the unpacked steps (5+ tokens) skip the activations' f16 lo halves, half the MMAs and
// activation loads, at f16-activation accuracy (~1e-3 relative: the CPU check's bound fails by design); it times
// what the f32-level hi + lo split costs where the consumers, not the ring, bound the step (T = 16).
#ifndef MK_HILO
#define MK_HILO 1
#endif
// MK_UNROLL (experiment knob): unroll factor of the consumers' K-step loops. 1 since s16r5 (H100, same call:
// T = 1 / 4 / 8 / 16 10.28 / 15.02 / 21.35 / 34.23 ms vs 10.44 / 15.17 / 21.66 / 34.59 with 2; s11r3: 4 was
// slower than 2): ring_consume's code halves (MXFP4 57 -> 33 KB, FP8 35 -> 23 KB of SASS), and the instruction
// cache matters more than the loop's extra independent steps.
#ifndef MK_UNROLL
#define MK_UNROLL 1
#endif
#define MK_STR(x) #x
#define MK_PRAGMA_UNROLL(n) _Pragma(MK_STR(unroll n))
// The strided loops of the once-per-layer routing / schedule / epilogue code stay rolled: they run one or two
// iterations a thread at T = 1, and the compiler's 4x unrolled copies and their remainder paths are
// instruction-cache lines fetched cold every layer (s15r1, H100: T = 1 10.82 vs 11.18 ms).
#define MK_COLD_LOOP _Pragma("unroll 1")
// FP8 block scales of element kk (inside [k0, k0 + kc)) for this lane's rows gq, gq + 8 of both tiles.
__device__ __forceinline__ void f8_scales(const uint8_t* const (&spr)[2][2], int k, float (&sa)[2], float (&sbv)[2]) {
#pragma unroll
  for (int rt = 0; rt < 2; rt++) {
    sa[rt] = __ldg(reinterpret_cast<const float*>(spr[rt][0]) + k / 128);
    sbv[rt] = __ldg(reinterpret_cast<const float*>(spr[rt][1]) + k / 128);
  }
}
// This warp's K steps ks0, ks0 + MK_CW, ... < nks of a chunk, both row tiles. Branch-free per step (tokens past a
// tile's count read zeros), so loads of both tiles are in flight together, and four independent MMA chains (hi /
// lo activation halves x two tiles) per column tile. SAME: both tiles use the same activation rows.
template <int FMT, int NT, bool SAME, bool SRING, bool TL>
__device__ __forceinline__ void mma_steps(unsigned int wb, unsigned int sb, unsigned int pr, unsigned int tsel,
                                          const unsigned int (&xa)[2][NT],
                                          const uint8_t* const (&spr)[2][2], int k0, int kseg, int ks0, int nks,
                                          float (&acc)[2][NT][4]) {
  constexpr bool PF = FMT == FMT_F8 && MK_F8PF;
  float fa[2] = {0.f, 0.f}, fb[2] = {0.f, 0.f};  // PF: this step's scales
  if (PF && ks0 < nks) f8_scales(spr, k0 + kseg + ks0 * 32, fa, fb);
MK_PRAGMA_UNROLL(MK_UNROLL)
  for (int ks = ks0; ks < nks; ks += MK_CW) {
    const int kk = kseg + ks * 32;  // element offset of the step inside [k0, k0 + kc)
    unsigned int b[2][NT][8];
#pragma unroll
    for (int rt = 0; rt < (SAME ? 1 : 2); rt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const bool on = xa[rt][nt] != ~0u;
        const uint4 h = on ? lds128(xa[rt][nt] + 4u * kk) : make_uint4(0u, 0u, 0u, 0u);
        const uint4 l = on && MK_HILO ? lds128((xa[rt][nt] + 4u * kk) ^ 16u) : make_uint4(0u, 0u, 0u, 0u);
        b[rt][nt][0] = h.x; b[rt][nt][1] = h.y; b[rt][nt][2] = h.z; b[rt][nt][3] = h.w;
        b[rt][nt][4] = l.x; b[rt][nt][5] = l.y; b[rt][nt][6] = l.z; b[rt][nt][7] = l.w;
      }
    unsigned int pa[2][4], pb[2][4];
    float sa[2], sbv[2];
    step_weights<FMT, SRING, TL>(wb, sb, pr, tsel, spr, k0, kk, ks, pa, pb, sa, sbv);
    if (PF) {  // this step's scales, and the next step's loads (the last step reloads its own)
#pragma unroll
      for (int rt = 0; rt < 2; rt++) { sa[rt] = fa[rt]; sbv[rt] = fb[rt]; }
      f8_scales(spr, k0 + kseg + (ks + MK_CW < nks ? ks + MK_CW : ks) * 32, fa, fb);
    }
#pragma unroll
    for (int rt = 0; rt < 2; rt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const unsigned int(&bb)[8] = b[SAME ? 0 : rt][nt];
        float th[4] = {0.f, 0.f, 0.f, 0.f}, tl[4] = {0.f, 0.f, 0.f, 0.f};
        mma_f16(th, pa[rt][0], pb[rt][0], pa[rt][1], pb[rt][1], bb[0], bb[1]);
        if (MK_HILO) mma_f16(tl, pa[rt][0], pb[rt][0], pa[rt][1], pb[rt][1], bb[4], bb[5]);
        mma_f16(th, pa[rt][2], pb[rt][2], pa[rt][3], pb[rt][3], bb[2], bb[3]);
        if (MK_HILO) mma_f16(tl, pa[rt][2], pb[rt][2], pa[rt][3], pb[rt][3], bb[6], bb[7]);
        acc[rt][nt][0] += (th[0] + tl[0]) * sa[rt];
        acc[rt][nt][1] += (th[1] + tl[1]) * sa[rt];
        acc[rt][nt][2] += (th[2] + tl[2]) * sbv[rt];
        acc[rt][nt][3] += (th[3] + tl[3]) * sbv[rt];
      }
  }
}

#ifndef MK_PACK
#define MK_PACK 1
#endif
// Up to 4 tokens per row tile: the hi and lo activation halves ride in the MMA's N dimension (column j < 4: hi
// of token j, column 4 + j: its lo), so a step is two MMAs per row tile instead of four and one activation load.
// Lane (gq, tq) loads column gq's half (xa already points at it); the accumulators hold hi columns in lanes
// tq < 2 and lo columns in lanes tq >= 2, added when the row group ends (lanes tq and tq ^ 2).
template <int FMT, bool SAME, bool SRING, bool TL>
__device__ __forceinline__ void mma_steps_packed(unsigned int wb, unsigned int sb, unsigned int pr, unsigned int tsel,
                                                 const unsigned int (&xa)[2][1],
                                                 const uint8_t* const (&spr)[2][2], int k0, int kseg, int ks0,
                                                 int nks, float (&acc)[2][1][4]) {
  constexpr bool PF = FMT == FMT_F8 && MK_F8PF;
  float fa[2] = {0.f, 0.f}, fb[2] = {0.f, 0.f};  // PF: this step's scales
  if (PF && ks0 < nks) f8_scales(spr, k0 + kseg + ks0 * 32, fa, fb);
MK_PRAGMA_UNROLL(MK_UNROLL)
  for (int ks = ks0; ks < nks; ks += MK_CW) {
    const int kk = kseg + ks * 32;
    uint4 b[2];
#pragma unroll
    for (int rt = 0; rt < (SAME ? 1 : 2); rt++)
      b[rt] = xa[rt][0] != ~0u ? lds128(xa[rt][0] + 4u * kk) : make_uint4(0u, 0u, 0u, 0u);
    unsigned int pa[2][4], pb[2][4];
    float sa[2], sbv[2];
    step_weights<FMT, SRING, TL>(wb, sb, pr, tsel, spr, k0, kk, ks, pa, pb, sa, sbv);
    if (PF) {  // this step's scales, and the next step's loads (the last step reloads its own)
#pragma unroll
      for (int rt = 0; rt < 2; rt++) { sa[rt] = fa[rt]; sbv[rt] = fb[rt]; }
      f8_scales(spr, k0 + kseg + (ks + MK_CW < nks ? ks + MK_CW : ks) * 32, fa, fb);
    }
#pragma unroll
    for (int rt = 0; rt < 2; rt++) {
      const uint4 bb = b[SAME ? 0 : rt];
      float th[4] = {0.f, 0.f, 0.f, 0.f};
      mma_f16(th, pa[rt][0], pb[rt][0], pa[rt][1], pb[rt][1], bb.x, bb.y);
      mma_f16(th, pa[rt][2], pb[rt][2], pa[rt][3], pb[rt][3], bb.z, bb.w);
      acc[rt][0][0] += th[0] * sa[rt];
      acc[rt][0][1] += th[1] * sa[rt];
      acc[rt][0][2] += th[2] * sbv[rt];
      acc[rt][0][3] += th[3] * sbv[rt];
    }
  }
}

// The specializations of a chunk's steps: activation rows shared by both tiles or not; MXFP4 scales in the ring or
// global (TL: the slot's layout, see step_weights).
template <int FMT, bool TL>
__device__ __forceinline__ void mma_dispatch_packed(unsigned int wb, unsigned int sb, unsigned int pr,
                                                    unsigned int tsel, const unsigned int (&xa)[2][1],
                                                    const uint8_t* const (&spr)[2][2], int k0, int kseg, int ks0,
                                                    int nks, float (&acc)[2][1][4], bool same, bool sring) {
  if (FMT == FMT_MXFP4 && sring) {
    if (same) mma_steps_packed<FMT, true, true, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
    else mma_steps_packed<FMT, false, true, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
  } else {
    if (same) mma_steps_packed<FMT, true, false, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
    else mma_steps_packed<FMT, false, false, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
  }
}
template <int FMT, int NT, bool TL>
__device__ __forceinline__ void mma_dispatch(unsigned int wb, unsigned int sb, unsigned int pr, unsigned int tsel,
                                             const unsigned int (&xa)[2][NT], const uint8_t* const (&spr)[2][2],
                                             int k0, int kseg, int ks0, int nks, float (&acc)[2][NT][4], bool same,
                                             bool sring) {
  if (FMT == FMT_MXFP4 && sring) {
    if (same) mma_steps<FMT, NT, true, true, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
    else mma_steps<FMT, NT, false, true, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
  } else {
    if (same) mma_steps<FMT, NT, true, false, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
    else mma_steps<FMT, NT, false, false, TL>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc);
  }
}

#ifndef MK_SUM1
#define MK_SUM1 1
#endif
// MK_GFAST (default 1 since s17r2, part of v19): see ring_consume's uniform row-group setup; 0: every group general.
#ifndef MK_GFAST
#define MK_GFAST 1
#endif
// MK_GFAST2 (experiment knob): see ring_consume's mode-2 row-group setup.
#ifndef MK_GFAST2
#define MK_GFAST2 0
#endif
// A row group's activation fragment addresses (xa: ~0u past a tile's tn tokens; xl: the tiles' member-list starts,
// -1: rows j), whether the hi / lo halves are packed, and whether both tiles read the same rows.
template <int NT>
__device__ __forceinline__ void group_xa(const TileRows& d, const int (&tn)[2], const int (&xl)[2], unsigned int xsb,
                                         int gq, int tq, unsigned int (&xa)[2][NT], bool& packed, bool& same) {
  packed = MK_PACK && NT == 1 && tn[0] <= 4 && tn[1] <= 4;
#pragma unroll
  for (int rt = 0; rt < 2; rt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      // Packed: lanes gq < 4 read token gq's hi half, lanes gq >= 4 token gq - 4's lo half.
      const int j = packed ? (gq & 3) : nt * 8 + gq;
      if (j < tn[rt]) {
        const int xr = xl[rt] >= 0 ? d.xrow(xl[rt], j) : j;  // activation row (frag_hi: its halves' order)
        xa[rt][nt] = xsb + 4u * (unsigned int)(xr * d.xstride) + 32u * tq +
                     (frag_hi(xr) ^ (packed && gq >= 4 ? 16u : 0u));
      } else {
        xa[rt][nt] = ~0u;
      }
    }
  same = tn[0] == tn[1];
#pragma unroll
  for (int nt = 0; nt < NT; nt++) same = same && __all_sync(0xffffffffu, xa[0][nt] == xa[1][nt]);
}

// Consumers (warps 0 .. MK_CW - 1). NT = 8-token MMA column tiles (1: up to 8 tokens, 2: up to 16).
// The cross-warp sum at the end of a row group: with NT = 1 each warp writes both tiles' partials into one half
// of a double buffer (halves alternate by group), one named barrier, then the consumers add them up in warp
// order; the next group writes the other half, and the group after that passes the next group's barrier first,
// so no second barrier is needed. NT = 2 sums one 16-row tile at a time (two barriers each).
template <int FMT, int NT>
__device__ __noinline__ void ring_consume(const uint8_t* W, int k0, int kc, const float* xs, int nrows, float* stage,
                                          unsigned int it, bool sring) {
  const TileRows& d = mk_tile;
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  unsigned long long* const stat = mk_prof_on ? mk_stat : nullptr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;  // MMA fragment row group and quad lane
  constexpr int SB = RingFmt<FMT>::SB;
  constexpr int PITCH = RingFmt<FMT>::PITCH;
  // Tensor-copied slots (TL): fragment row gq reads slot row pr, a permutation that keeps each wavefront's rows
  // on distinct swizzle keys (FP8: 4 rows per half-warp, bf16: 2 per quarter); tsel / wo: the lane's unit bits and
  // byte offset inside its 16-byte unit. The partial sums go to row pr.
  const unsigned int pr = FMT == FMT_F8 ? (((unsigned)gq & 3u) << 1) | ((unsigned)gq >> 2)
                          : FMT == FMT_BF16 ? (((unsigned)gq & 1u) << 2) | ((unsigned)gq >> 1)
                                            : (unsigned)gq;
  const unsigned int tsel = FMT == FMT_F8 ? (unsigned)tq >> 1 : FMT == FMT_BF16 ? (unsigned)tq : 0u;
  const unsigned int wo = FMT == FMT_F8 ? 8u * ((unsigned)tq & 1u) : FMT == FMT_MXFP4 ? 4u * (unsigned)tq : 0u;
  bool tl = false;
  const int kbytes = el_bytes<FMT>(kc);
  const int seg = min(RING_SEG, kbytes);
  const int nseg = (kbytes + seg - 1) / seg;
  const int segel = FMT == FMT_BF16 ? seg / 2 : FMT == FMT_F8 ? seg : seg * 2;
  const int nchunks = ((nrows + RING_ROWS - 1) / RING_ROWS) * nseg;
  const unsigned int ringb = smem_u32(mk_smem);
  const unsigned int xsb = smem_u32(xs);
  PH_END(2)
  const long long tstart = clock64();
  const unsigned long long gstart = stat && threadIdx.x == 0 ? gtimer() : 0;
  long long twait = 0;
  float acc[2][NT][4];
#pragma unroll
  for (int rt = 0; rt < 2; rt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[rt][nt][e] = 0.f;
  // Per row group: each tile's token count (warp-uniform), this lane's activation row address per column tile
  // (~0u: none), the global scale rows of this lane's two rows, and whether the hi / lo halves are packed.
  int tn[2];
  bool same = true, packed = false;
  unsigned int xa[2][NT];
  const uint8_t* spr[2][2];
  // Chunk c = g * nseg + sg of the call is ring chunk it + c: its slot and parity, the row group g and segment
  // sg, and the round-robin position of the call's K steps (rot = steps dealt so far mod MK_CW) all advance
  // incrementally (no division per chunk).
  int g = 0, sg = 0, rot = 0, slot = (int)(it % RING_NS);
  unsigned int parity = (it / RING_NS) & 1u;
  const int nks_full = seg / SB, nks_last = (kbytes - (nseg - 1) * seg) / SB;
  const int rot_full = nks_full % MK_CW, rot_last = nks_last % MK_CW;
  // MK_GFAST: a call whose rows all read the same activation rows (modes 0, 1, 3) sets up each whole row group
  // (all 32 rows below nrows) from values computed once here: both tiles take the call's d.n tokens at the same
  // activation addresses, and only FP8 / global MXFP4 scale rows are looked up (plain row maps: mode 3 with global
  // scales keeps the general setup, whose invalid rows must not address scales). Rows past a mode-3 tile's columns
  // compute garbage partials from stale slot rows, dropped by the sum like any invalid row's.
  const bool uni = MK_GFAST && d.mode != 2 && !(d.mode == 3 && (FMT == FMT_F8 || (FMT == FMT_MXFP4 && !sring)));
  // MK_GFAST2: MoE down (mode 2) whose experts' column tiles have no padding rows (cols a multiple of 16), scales
  // in the ring or none: a whole row group's setup is its two 16-row tiles' experts, no per-row tests.
  const bool uni2 = MK_GFAST2 && d.mode == 2 && d.cols == moe_colsp(d.cols) &&
                    !(FMT == FMT_F8 || (FMT == FMT_MXFP4 && !sring));
  const int nu = d.n;
  const bool packed_u = MK_PACK && NT == 1 && nu <= 4;
  unsigned int xa_u[NT];
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    const int j = packed_u ? (gq & 3) : nt * 8 + gq;
    xa_u[nt] = j < nu ? xsb + 4u * (unsigned int)(j * d.xstride) + 32u * tq + (frag_hi(j) ^ (packed_u && gq >= 4 ? 16u : 0u))
                      : ~0u;
  }
  for (int c = 0; c < nchunks; c++) {
    if (sg == 0 && uni && (g + 1) * RING_ROWS <= nrows) {
#pragma unroll
      for (int rt = 0; rt < 2; rt++) {
        tn[rt] = nu;
        const int r0 = g * RING_ROWS + rt * 16;
        if (FMT == FMT_F8 || (FMT == FMT_MXFP4 && !sring)) {
          spr[rt][0] = srow_ptr<FMT>(W, d.ws, d.map(r0 + gq), d.K);
          spr[rt][1] = srow_ptr<FMT>(W, d.ws, d.map(r0 + gq + 8), d.K);
        } else {
          spr[rt][0] = W;
          spr[rt][1] = W;
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) xa[rt][nt] = xa_u[nt];
      }
      packed = packed_u;
      same = true;
    } else if (sg == 0 && uni2 && (g + 1) * RING_ROWS <= nrows) {
      // MK_GFAST2: each 16-row tile is whole rows of one expert (no padding rows), all valid.
      int xl[2];
#pragma unroll
      for (int rt = 0; rt < 2; rt++) {
        const int uu = (int)d.rdiv.div((unsigned)(g * RING_ROWS + rt * 16));
        tn[rt] = sld(d.cnt + uu);
        xl[rt] = sld(d.mst + uu);
        spr[rt][0] = W;
        spr[rt][1] = W;
      }
      group_xa<NT>(d, tn, xl, xsb, gq, tq, xa, packed, same);
    } else if (sg == 0) {
      int xl[2];
#pragma unroll
      for (int rt = 0; rt < 2; rt++) {
        const int r0 = g * RING_ROWS + rt * 16;
        bool oka, okb;
        if (FMT == FMT_F8 || (FMT == FMT_MXFP4 && !sring)) {  // the steps read scales through these rows
          const RowInfo ra = ring_row<FMT>(W, d, r0 + gq, nrows);
          const RowInfo rb = ring_row<FMT>(W, d, r0 + gq + 8, nrows);
          spr[rt][0] = ra.sp;
          spr[rt][1] = rb.sp;
          oka = ra.ok;
          okb = rb.ok;
        } else {
          // Scales in the ring (MXFP4) or none (bf16): only whether the rows exist.
          spr[rt][0] = W;
          spr[rt][1] = W;
          oka = row_ok(d, r0 + gq, nrows);
          okb = row_ok(d, r0 + gq + 8, nrows);
        }
        const bool tv = __any_sync(0xffffffffu, oka || okb);
        int n = d.n;
        xl[rt] = -1;
        if (d.mode == 2) {
          const int uu = (int)d.rdiv.div((unsigned)min(r0, nrows - 1));
          n = sld(d.cnt + uu);
          xl[rt] = sld(d.mst + uu);
        }
        tn[rt] = tv ? n : 0;
      }
      group_xa<NT>(d, tn, xl, xsb, gq, tq, xa, packed, same);
    }
    const bool lastseg = sg == nseg - 1;
    const int nks = lastseg ? nks_last : nks_full;
    if (stat) {
      const long long tw0 = clock64();
      mbar_wait(full + slot, parity);
      twait += clock64() - tw0;
    } else {
      mbar_wait(full + slot, parity);
    }
#if MK_TMAP
    tl = mk_slay[slot] != 0;
#endif
    const unsigned int wb = tl ? ringb + slot * RING_SLOT + pr * 128 + wo
                               : ringb + slot * RING_SLOT + gq * PITCH + tq * (SB / 4);
    const unsigned int sb = tl ? ringb + slot * RING_SLOT + RING_TSCALE_OFF + pr * 64
                               : ringb + slot * RING_SLOT + RING_SCALE_OFF + gq * RING_SSTR;
    const int ks0 = warp >= rot ? warp - rot : warp + MK_CW - rot;
    const int kseg = sg * segel;
    // Specializations: hi / lo packed or not; activation rows shared by both tiles or not; MXFP4 scales in the
    // ring or global.
    // MK_NOCOMPUTE (diagnostic): the ring's rate alone, no MMA steps (wrong results).
    if constexpr (NT == 1) {
      if (packed && !MK_NOCOMPUTE) {
        if (tl) mma_dispatch_packed<FMT, true>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc, same, sring);
        else mma_dispatch_packed<FMT, false>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc, same, sring);
      }
    }
    if (!packed && !MK_NOCOMPUTE) {
      if (tl) mma_dispatch<FMT, NT, true>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc, same, sring);
      else mma_dispatch<FMT, NT, false>(wb, sb, pr, tsel, xa, spr, k0, kseg, ks0, nks, acc, same, sring);
    }
#if MK_ARRIVE_ALL
    mbar_arrive(empty + slot);
#else
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + slot);
#endif
    rot += lastseg ? rot_last : rot_full;
    if (rot >= MK_CW) rot -= MK_CW;
    if (++slot == RING_NS) {
      slot = 0;
      parity ^= 1u;
    }
    if (!lastseg) {
      sg++;
      continue;
    }
    sg = 0;
    const int gcur = g++;  // the group whose partials are summed below
    if (packed) {
      // Fold the lo columns into the hi ones (lane tq ^ 2 holds the same tokens' other half).
#pragma unroll
      for (int rt = 0; rt < 2; rt++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[rt][0][e] += __shfl_xor_sync(0xffffffffu, acc[rt][0][e], 2);
    }
    if (NT == 1 && MK_SUM1) {
      // Double-buffered partials [2][MK_CW][32 rows][8 tokens]; one barrier per group.
      float* red = SM_MMR + (gcur & 1) * (MK_CW * 32 * 8);
#pragma unroll
      for (int rt = 0; rt < 2; rt++) {
        float* r = red + (warp * 32 + rt * 16 + (tl ? (int)pr : gq)) * 8 + 2 * tq;
        r[0] = acc[rt][0][0];
        r[1] = acc[rt][0][1];
        r[64] = acc[rt][0][2];
        r[65] = acc[rt][0][3];
#pragma unroll
        for (int e = 0; e < 4; e++) acc[rt][0][e] = 0.f;
      }
      consumers_sync();
      // Only the tiles' tokens (tn: 0 when a tile has no valid rows); the summing threads rotate by group.
      const int n0 = tn[0], tot = 16 * (tn[0] + tn[1]);
      const int me = (int)(((unsigned)threadIdx.x + 32u * (unsigned)gcur) % (unsigned)(MK_CW * 32));
      for (int e = me; e < tot; e += MK_CW * 32) {
        const int rt = e >= 16 * n0 ? 1 : 0;
        const int nn = tn[rt], e2 = e - rt * 16 * n0;
        const int row = div_small(e2, nn), j = e2 - row * nn;
        int col, n, xl, uu;
        if (row_out(d, gcur * RING_ROWS + rt * 16 + row, nrows, col, n, xl, uu) && j < n) {
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < MK_CW; w++) sum += red[(w * 32 + rt * 16 + row) * 8 + j];
          const int orow = xl >= 0 ? sld(d.ml + xl + j) : j;
          stage[orow * d.sstride + col] += sum;
        }
      }
      continue;
    }
    // Sum the warps' partials of this row group in warp order into the stage, one 16-row tile at a time.
    float* red = SM_MMR;
#pragma unroll
    for (int rt = 0; rt < 2; rt++) {
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        float* r = red + (warp * 16 + (tl ? (int)pr : gq)) * RED_TOK + nt * 8 + 2 * tq;
        r[0] = acc[rt][nt][0];
        r[1] = acc[rt][nt][1];
        r[8 * RED_TOK] = acc[rt][nt][2];
        r[8 * RED_TOK + 1] = acc[rt][nt][3];
#pragma unroll
        for (int e = 0; e < 4; e++) acc[rt][nt][e] = 0.f;
      }
      consumers_sync();
      // Only the tile's tokens (tn: 0 when it has no valid rows), not all of its MMA columns.
      const int nn = tn[rt];
      for (int e = threadIdx.x; e < 16 * nn; e += MK_CW * 32) {
        const int row = div_small(e, nn), j = e - row * nn;
        int col, n, xl, uu;
        if (row_out(d, gcur * RING_ROWS + rt * 16 + row, nrows, col, n, xl, uu) && j < n) {
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < MK_CW; w++) sum += red[(w * 16 + row) * RED_TOK + j];
          const int orow = xl >= 0 ? sld(d.ml + xl + j) : j;
          stage[orow * d.sstride + col] += sum;
        }
      }
      consumers_sync();
    }
  }
  if (stat && threadIdx.x == 0) {
    stat[0] += twait;
    stat[1] += clock64() - tstart;
#if !MK_PHASE
    stat[4] += gtimer() - gstart;
#endif
  }
  PH_BEGIN(3)
}

// Chunks a ring call consumes (to advance the running counter).
template <int FMT>
__device__ __forceinline__ unsigned int ring_chunks(int kc, int nrows) {
  const int kbytes = el_bytes<FMT>(kc);
  const int seg = min(RING_SEG, kbytes);
  return (unsigned int)(((nrows + RING_ROWS - 1) / RING_ROWS) * ((kbytes + seg - 1) / seg));
}

#if MK_V23 || MK_V23F8
// The pieces both v23 consumers (ring_consume23: MXFP4, ring_consume_kp: FP8) share. Each warp owns one 16-row MMA
// tile: rows gq and gq + 8 of it in this lane, accumulators acc[NT][4] (NT 8-token column tiles).

// One K step of a tile: its decoded weights pa (row gq) and pb (row gq + 8), scaled by fa / fb, against the
// activations at xa + xk. PACKED: hi / lo activation halves in the MMA's N columns (up to 4 tokens, see
// mma_steps_packed), else NT column tiles with hi and lo MMAs.
template <int NT, bool PACKED>
__device__ __forceinline__ void mma_step23(const unsigned int (&pa)[4], const unsigned int (&pb)[4],
                                           const unsigned int (&xa)[NT], unsigned int xk, float fa, float fb,
                                           float (&acc)[NT][4]) {
  if (PACKED) {
    const uint4 b = lds128(xa[0] + xk);
    float th[4] = {0.f, 0.f, 0.f, 0.f};
    mma_f16(th, pa[0], pb[0], pa[1], pb[1], b.x, b.y);
    mma_f16(th, pa[2], pb[2], pa[3], pb[3], b.z, b.w);
    acc[0][0] += th[0] * fa;
    acc[0][1] += th[1] * fa;
    acc[0][2] += th[2] * fb;
    acc[0][3] += th[3] * fb;
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const uint4 h = lds128(xa[nt] + xk);
      const uint4 l = MK_HILO ? lds128((xa[nt] + xk) ^ 16u) : make_uint4(0u, 0u, 0u, 0u);
      float th[4] = {0.f, 0.f, 0.f, 0.f}, tl[4] = {0.f, 0.f, 0.f, 0.f};
      mma_f16(th, pa[0], pb[0], pa[1], pb[1], h.x, h.y);
      if (MK_HILO) mma_f16(tl, pa[0], pb[0], pa[1], pb[1], l.x, l.y);
      mma_f16(th, pa[2], pb[2], pa[3], pb[3], h.z, h.w);
      if (MK_HILO) mma_f16(tl, pa[2], pb[2], pa[3], pb[3], l.z, l.w);
      acc[nt][0] += (th[0] + tl[0]) * fa;
      acc[nt][1] += (th[1] + tl[1]) * fa;
      acc[nt][2] += (th[2] + tl[2]) * fb;
      acc[nt][3] += (th[3] + tl[3]) * fb;
    }
  }
}

// A tile's tokens for a row group: tv (warp-uniform) whether any of its rows is valid, r0 its first row. Sets the
// token count tn (0: nothing to compute), whether the hi / lo halves are packed, and each lane's activation row
// address; lanes past the tile's tokens read token 0's row (their columns are never written), so the step loops
// have no predicated loads.
template <int NT>
__device__ __forceinline__ void tile_tokens23(const TileRows& d, int r0, bool tv, unsigned int xsb, int& tn,
                                              bool& packed, unsigned int (&xa)[NT]) {
  const int gq = (threadIdx.x & 31) >> 2, tq = threadIdx.x & 3;
  int n = d.n, xl = -1;
  if (d.mode == 2 && tv) {
    const int uu = (int)d.rdiv.div((unsigned)r0);
    n = sld(d.cnt + uu);
    xl = sld(d.mst + uu);
  }
  tn = tv ? n : 0;
  packed = MK_PACK && NT == 1 && tn <= 4;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    const int j = packed ? (gq & 3) : nt * 8 + gq;
    const int xr = tn == 0 ? 0 : xl >= 0 ? d.xrow(xl, j < tn ? j : 0) : (j < tn ? j : 0);
    xa[nt] = xsb + 4u * (unsigned int)(xr * d.xstride) + 32u * tq + (frag_hi(xr) ^ (packed && gq >= 4 ? 16u : 0u));
  }
}

// A consumer's ring-call profile (MK_PHASE builds aside): its waits for full slots, its time in the call and the
// global timer's span, added by thread 0 to the ring profile counters at the end (v22's ring_consume keeps its own
// copy: using this there reschedules the default kernel's SASS, which no device could time in session 23).
struct RingProf23 {
  unsigned long long* stat;
  long long tstart, twait;
  unsigned long long gstart;
  __device__ __forceinline__ RingProf23()
      : stat(mk_prof_on ? mk_stat : nullptr), tstart(clock64()), twait(0),
        gstart(stat && threadIdx.x == 0 ? gtimer() : 0ull) {}
  __device__ __forceinline__ void wait(unsigned long long* bar, unsigned int parity) {
    if (stat) {
      const long long tw0 = clock64();
      mbar_wait(bar, parity);
      twait += clock64() - tw0;
    } else {
      mbar_wait(bar, parity);
    }
  }
  __device__ __forceinline__ void end() {
    if (stat && threadIdx.x == 0) {
      stat[0] += twait;
      stat[1] += clock64() - tstart;
#if !MK_PHASE
      stat[4] += gtimer() - gstart;
#endif
    }
  }
};
// The ring slot and phase parity of a call's chunk c = it + c (both sides walk the same running chunk counter).
struct Slot23 {
  int slot;
  unsigned int parity;
  __device__ __forceinline__ explicit Slot23(unsigned int it) : slot((int)(it % RING_NS)), parity((it / RING_NS) & 1u) {}
  __device__ __forceinline__ void next() {
    if (++slot == RING_NS) {
      slot = 0;
      parity ^= 1u;
    }
  }
};
// A consumer's release of a ring slot: every thread arrives; thread `lead` also for the extra warps that skip the
// call (the empty barriers count MK_CW * 32 arrivals).
__device__ __forceinline__ void slot_release23(unsigned long long* bar, unsigned int extra, bool lead) {
  mbar_arrive(bar);
  if (extra > 0 && lead) mbar_arrive_n(bar, extra);
}

// The packed layout's lo columns folded into the hi ones at a group's end (lane tq ^ 2 holds the same tokens'
// other half); the results are then in lanes tq < 2.
template <int NT>
__device__ __forceinline__ void fold_packed23(bool packed, float (&acc)[NT][4]) {
  if (packed) {
#pragma unroll
    for (int e = 0; e < 4; e++) acc[0][e] += __shfl_xor_sync(0xffffffffu, acc[0][e], 2);
  }
}
// A tile's results into the stage: for this lane's rows r0 + gq + 8 hr and tokens j = nt * 8 + 2 tq + e, the
// value v(nt, hr, e, j) (accumulator acc[nt][2 hr + e], with whatever the caller adds); rows past nrows, padding and
// tokens past the row's count dropped.
template <int NT, class V>
__device__ __forceinline__ void tile_store23(const TileRows& d, int r0, int nrows, float* stage, V v) {
  const int gq = (threadIdx.x & 31) >> 2, tq = threadIdx.x & 3;
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    int col, n, xl, uu;
    if (!row_out(d, r0 + gq + 8 * hr, nrows, col, n, xl, uu)) continue;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int j = nt * 8 + 2 * tq + e;
        if (j >= n) continue;
        const int orow = xl >= 0 ? sld(d.ml + xl + j) : j;
        stage[orow * d.sstride + col] += v(nt, hr, e, j);
      }
  }
}
template <int NT>
__device__ __forceinline__ void zero_acc23(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[nt][e] = 0.f;
}
#endif  // MK_V23 || MK_V23F8

#if MK_V23
// ---------------------------------------------------------------------------------------------------------------
// v23 row-owning MXFP4 ring (s22r3's probe: 84-89 % of the copy rate for this structure, against v22's derived
// 44-61 % for the MoE rings). A chunk is 64 rows (four 16-row MMA tiles) x one 512-byte K segment (1024
// elements) in a v22 ring slot; consumer warp t < 4 owns tile t of every row group for the call's whole K range,
// accumulating in registers across the group's segments, and writes its rows' outputs to the stage itself when the
// group ends. Warps 4 .. MK_CW - 1 skip the call; warp 0's thread 0 arrives on each slot's empty barrier for them
// (the barrier counts MK_CW * 32 arrivals), so every reading thread still arrives for itself (racecheck).
// Slot layouts (mk_slay23, written by the producer before the slot's full barrier):
//   tiled (1): tile t at t * 16 seg, [step s < seg / 16][row r < 16][16 bytes] (a lane reads 4 bytes of rows gq and
//     gq + 8: 8 rows x 16 bytes, one wavefront); scales at V23_TSCALE_OFF + t seg, [step s][row r] bytes. Filled
//     by one bulk copy per run of consecutive tiled blocks (see mimo_tile's step-major layout), two per run with
//     the scales.
//   rows (0): row r at r V23_PITCH (rows 16 bytes apart in the banks), scales at V23_SCALE_OFF + r V23_SSTR;
//     one bulk copy per row (and its scales): chunks whose tiles are not all whole tiled blocks.
#define V23_ROWS 64
#define V23_SEG 512
#define V23_PITCH (V23_SEG + 16)
#define V23_SSTR 48
#define V23_SCALE_OFF (V23_ROWS * V23_PITCH)
#define V23_TSCALE_OFF (4 * 16 * V23_SEG)
static_assert(V23_SCALE_OFF + V23_ROWS * V23_SSTR <= RING_SLOT, "a row-copied v23 chunk fits a ring slot");
static_assert(V23_TSCALE_OFF + 4 * V23_SEG <= RING_SLOT, "a tiled v23 chunk fits a ring slot");
// MK_V23S (experiment knob): sets of four consumer warps; set s takes the row groups g with g % MK_V23S == s (the
// probe: 8 warps 88.6 % of the copy rate against 84.0 % for 4). 2 needs MK_CW >= 8 (MIMO_THREADS=288).
#ifndef MK_V23S
#define MK_V23S 1
#endif
static_assert(MK_CW >= 4 * MK_V23S, "v23 needs four consumer warps a set");
#if MK_DEC || MK_TMAP || MK_LDGSTS || MK_ONECOPY || MK_NOCOPY
#error "MK_V23 streams MXFP4 through its own producer: MK_DEC / MK_TMAP / MK_LDGSTS / MK_ONECOPY / MK_NOCOPY are v22 knobs"
#endif
__shared__ unsigned char mk_slay23[RING_NS];

// Chunks a v23 call streams.
__device__ __forceinline__ unsigned int v23_chunks(int kc, int nrows) {
  const int kbytes = kc / 2, seg = min(V23_SEG, kbytes);
  return (unsigned int)(((nrows + V23_ROWS - 1) / V23_ROWS) * ((kbytes + seg - 1) / seg));
}
// Tiled block b (16 rows) of K segment sgg in the step-major copy of a matrix with nsg segments a row.
__device__ __forceinline__ long long v23_block(long long b, long long sgg, long long nsg) {
  return ((b >> 2) * nsg + sgg) * 4 + (b & 3);
}

// Issues chunks [cb, ce) of the call (clamped to its chunk count) and returns how many it issued.
__device__ __noinline__ int ring_produce23(const uint8_t* W, const TileRows& d, int k0, int kc, int nrows,
                                           unsigned int it, int cb, int ce) {
  const bool sring = ring_sring<FMT_MXFP4>(d, k0, kc);
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  uint8_t* const rbuf = reinterpret_cast<uint8_t*>(mk_smem);
  unsigned long long* const stat = mk_prof_on ? mk_stat : nullptr;
  const int lane = threadIdx.x & 31;
  const int kbytes = kc / 2, seg = min(V23_SEG, kbytes), nseg = (kbytes + seg - 1) / seg, segel = 2 * seg;
  const int nchunks = ((nrows + V23_ROWS - 1) / V23_ROWS) * nseg;
  const int kb0 = k0 / 2, rowbytes = d.K / 2;
  const int tseg = min(V23_SEG, rowbytes), nsgt = (rowbytes + tseg - 1) / tseg;
  const long long tstart = clock64();
  long long twait = 0;
  const uint8_t* const tw = mk_tw;
  const uint8_t* const tsc = mk_tsc;
  const bool tcall = MK_TILED && tw != nullptr && sring && tsc != nullptr && kb0 % tseg == 0 && seg == tseg;
  const uint8_t* rp[2] = {W, W};
  const uint8_t* sp[2] = {W, W};
  bool ok[2] = {false, false};
  long long tb[4] = {-1, -1, -1, -1};
  bool tiled = false;
  ce = min(ce, nchunks);
  for (int c = cb; c < ce; c++) {
    const int g = (int)((unsigned)c / (unsigned)nseg), sg = c - g * nseg;
    const unsigned int u = it + c;
    const int slot = u % RING_NS;
    if (sg == 0 || c == cb) {
      tiled = tcall;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const RowInfo ri = ring_row<FMT_MXFP4>(W, d, g * V23_ROWS + 32 * h + lane, nrows);
        rp[h] = ri.rp; sp[h] = ri.sp; ok[h] = ri.ok;
        if (tcall) {
          long long hb[2];
          half_blocks(W, rp[h], ok[h], lane, rowbytes, hb);
          const unsigned int okm = __ballot_sync(0xffffffffu, ok[h]);
#pragma unroll
          for (int q = 0; q < 2; q++) {
            tb[2 * h + q] = hb[q];
            if (hb[q] < 0 && ((okm >> (16 * q)) & 0xffffu) != 0) tiled = false;  // a tile with rows, not tiled
          }
        }
      }
    }
    if (u >= RING_NS) {
      const long long t0 = clock64();
      mbar_wait(empty + slot, ((u / RING_NS) - 1) & 1);
      twait += clock64() - t0;
    }
    const int bytes = min(seg, kbytes - sg * seg);
    const int sbytes = sring ? bytes / 16 : 0;
    uint8_t* const dst = rbuf + slot * RING_SLOT;
    if (tiled && bytes == min(tseg, rowbytes - (kb0 + sg * seg))) {
      if (lane == 0) {
        mk_slay23[slot] = 1;
        const long long sgg = (kb0 + sg * seg) / tseg;
        // Runs of tiles t0 .. t1 - 1 whose blocks are consecutive inside one 4-block quad (contiguous in the copy).
        unsigned int tx = 0;
        for (int pass = 0; pass < 2; pass++) {
          int t0 = 0;
          while (t0 < 4) {
            if (tb[t0] < 0) { t0++; continue; }
            int t1 = t0 + 1;
            while (t1 < 4 && tb[t1] == tb[t1 - 1] + 1 && (tb[t1] & 3) != 0) t1++;
            const unsigned int n = (unsigned int)(t1 - t0);
            const unsigned int wbytes = (n - 1) * 16u * tseg + 16u * bytes, sb = (n - 1) * tseg + bytes;
            if (pass == 0) {
              tx += wbytes + sb;
            } else {
              const long long blk = v23_block(tb[t0], sgg, nsgt);
              bulk_g2s(dst + t0 * 16 * tseg, tw + blk * 16 * tseg, wbytes, full + slot);
              bulk_g2s(dst + V23_TSCALE_OFF + t0 * tseg, tsc + blk * tseg, sb, full + slot);
            }
            t0 = t1;
          }
          if (pass == 0) mbar_arrive_expect(full + slot, tx);
        }
      }
      __syncwarp();
      continue;
    }
    const unsigned int cnt = __popc(__ballot_sync(0xffffffffu, ok[0])) + __popc(__ballot_sync(0xffffffffu, ok[1]));
    if (lane == 0) {
      mk_slay23[slot] = 0;
      mbar_arrive_expect(full + slot, cnt * (bytes + sbytes));
    }
    __syncwarp();
#pragma unroll
    for (int h = 0; h < 2; h++) {
      if (!ok[h]) continue;
      const int r = 32 * h + lane;
      bulk_g2s(dst + r * V23_PITCH, rp[h] + kb0 + sg * seg, bytes, full + slot);
      if (sring) bulk_g2s(dst + V23_SCALE_OFF + r * V23_SSTR, sp[h] + (k0 + sg * segel) / 32, sbytes, full + slot);
    }
  }
  if (stat && lane == 0) {
    stat[2] += twait;
    stat[3] += clock64() - tstart;
  }
  return max(0, ce - cb);
}

// MK_V23U (experiment knob): unroll factor of the v23 step loop.
#ifndef MK_V23U
#define MK_V23U 1
#endif
// One tile's K steps s < nks of a chunk: weights at wa (row gq), scales at sa, in the slot's tiled layout (TL: rows
// 16 bytes apart, steps 256; scales 1 byte apart, steps 16) or the row layout (rows V23_PITCH apart, steps 16;
// scales V23_SSTR apart, steps 1); SRING false: scales from the global scale rows sp0 / sp1 instead. PACKED: hi / lo
// activation halves in the MMA's N columns (up to 4 tokens, see mma_steps_packed), else NT 8-token column tiles with
// hi and lo MMAs. Every lane's xa is a valid activation row (columns past the tile's tokens compute products that
// are never written), so the loop has no predicated loads.
template <int NT, bool PACKED, bool SRING, bool TL>
__device__ __forceinline__ void steps23(unsigned int wa, unsigned int sa, const uint8_t* sp0, const uint8_t* sp1,
                                        int k0, int kseg, int nks, const unsigned int (&xa)[NT],
                                        float (&acc)[NT][4]) {
  constexpr unsigned int WR8 = TL ? 128u : 8u * V23_PITCH, WST = TL ? 256u : 16u;
  constexpr unsigned int SR8 = TL ? 8u : 8u * V23_SSTR, SST = TL ? 16u : 1u;
  unsigned int xk = 4u * (unsigned int)kseg;  // byte offset of the step's activations in a row
MK_PRAGMA_UNROLL(MK_V23U)
  for (int s = 0; s < nks; s++) {
    unsigned int pa[4], pb[4];
    fp4_pairs(lds32(wa), pa);
    fp4_pairs(lds32(wa + WR8), pb);
    wa += WST;
    float fa, fb;
    if (SRING) {
      fa = fp4_scale(lds8(sa));
      fb = fp4_scale(lds8(sa + SR8));
      sa += SST;
    } else {
      const int kk = kseg + s * 32;
      fa = fp4_scale(__ldg(sp0 + (k0 + kk) / 32));
      fb = fp4_scale(__ldg(sp1 + (k0 + kk) / 32));
    }
    mma_step23<NT, PACKED>(pa, pb, xa, xk, fa, fb, acc);
    xk += 128u;
  }
}
// The specializations of a chunk's steps: tiled (scales in the ring) or row layout with ring or global scales.
template <int NT, bool PACKED>
__device__ __forceinline__ void steps23_chunk(bool tl, bool sring, unsigned int base, int tile, int seg,
                                              const uint8_t* sp0, const uint8_t* sp1, int k0, int kseg, int nks,
                                              const unsigned int (&xa)[NT], float (&acc)[NT][4]) {
  const int gq = (threadIdx.x & 31) >> 2, tq = threadIdx.x & 3;
  if (tl) {
    steps23<NT, PACKED, true, true>(base + tile * 16 * seg + gq * 16 + tq * 4,
                                    base + V23_TSCALE_OFF + tile * seg + gq, sp0, sp1, k0, kseg, nks, xa, acc);
  } else {
    const unsigned int wa = base + (tile * 16 + gq) * V23_PITCH + tq * 4;
    const unsigned int sa = base + V23_SCALE_OFF + (tile * 16 + gq) * V23_SSTR;
    if (sring) steps23<NT, PACKED, true, false>(wa, sa, sp0, sp1, k0, kseg, nks, xa, acc);
    else steps23<NT, PACKED, false, false>(wa, sa, sp0, sp1, k0, kseg, nks, xa, acc);
  }
}

// Consumer warp t < 4 of a v23 call: tile t of every 64-row group, NT 8-token MMA column tiles (1: up to 8 tokens).
template <int NT>
__device__ __noinline__ void ring_consume23(const uint8_t* W, int k0, int kc, const float* xs, int nrows,
                                            float* stage, unsigned int it, bool sring) {
  const TileRows& d = mk_tile;
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  const int warp = (threadIdx.x >> 5) & 3, set = (int)(threadIdx.x >> 7), lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int kbytes = kc / 2, seg = min(V23_SEG, kbytes), nseg = (kbytes + seg - 1) / seg, segel = 2 * seg;
  const int nchunks = ((nrows + V23_ROWS - 1) / V23_ROWS) * nseg;
  const unsigned int ringb = smem_u32(mk_smem), xsb = smem_u32(xs);
  constexpr unsigned int EXTRA = MK_CW * 32 - 128;  // the other warps' arrivals (the set's first thread adds them)
  PH_END(2)
  RingProf23 prof;
  float acc[NT][4];
  zero_acc23(acc);
  int tn = 0, r0 = 0;
  bool packed = false;
  unsigned int xa[NT];
  const uint8_t* sp0 = W;
  const uint8_t* sp1 = W;
  int g = 0, sg = 0;
  Slot23 sl(it);
  for (int c = 0; c < nchunks; c++) {
    if (MK_V23S > 1 && g % MK_V23S != set) {  // another set's group: its chunks pass by
      sl.next();
      if (++sg == nseg) {
        sg = 0;
        g++;
      }
      continue;
    }
    if (sg == 0) {
      // This warp's tile of group g: its rows' validity (and global scale rows), token count and activation rows.
      r0 = g * V23_ROWS + warp * 16;
      bool oka, okb;
      if (!sring) {
        const RowInfo ra = ring_row<FMT_MXFP4>(W, d, r0 + gq, nrows);
        const RowInfo rb = ring_row<FMT_MXFP4>(W, d, r0 + gq + 8, nrows);
        sp0 = ra.sp; sp1 = rb.sp; oka = ra.ok; okb = rb.ok;
      } else {
        oka = row_ok(d, r0 + gq, nrows);
        okb = row_ok(d, r0 + gq + 8, nrows);
      }
      tile_tokens23(d, r0, __any_sync(0xffffffffu, oka || okb), xsb, tn, packed, xa);
    }
    const bool lastseg = sg == nseg - 1;
    const int nks = min(seg, kbytes - sg * seg) / 16;
    prof.wait(full + sl.slot, sl.parity);
    if (tn > 0 && !MK_NOCOMPUTE) {
      const bool tl = mk_slay23[sl.slot] != 0;
      const unsigned int base = ringb + sl.slot * RING_SLOT;
      const int kseg = sg * segel;
      if constexpr (NT == 1) {
        if (packed) steps23_chunk<1, true>(tl, sring, base, warp, seg, sp0, sp1, k0, kseg, nks, xa, acc);
      }
      if (!packed) steps23_chunk<NT, false>(tl, sring, base, warp, seg, sp0, sp1, k0, kseg, nks, xa, acc);
    }
    slot_release23(empty + sl.slot, EXTRA, (threadIdx.x & 127) == 0);
    sl.next();
    if (!lastseg) {
      sg++;
      continue;
    }
    sg = 0;
    g++;
    if (tn > 0) {
      fold_packed23(packed, acc);
      if (!packed || tq < 2) tile_store23<NT>(d, r0, nrows, stage, [&](int nt, int hr, int e, int) { return acc[nt][2 * hr + e]; });
    }
    zero_acc23(acc);
  }
  prof.end();
  PH_BEGIN(3)
}
#endif  // MK_V23

#if MK_V23F8
static_assert(2 * MK_V23F8 <= MK_CW, "MK_V23F8 = KP needs 2 KP consumer warps");
static_assert(MK_V23F8 >= 1 && MK_V23F8 <= 4, "MK_V23F8: 1 to 4 K parts");
#if MK_DEC || MK_TMAP || MK_LDGSTS || MK_ONECOPY || MK_NOCOPY
#error "MK_V23F8 reads v22's row layout: MK_DEC / MK_TMAP / MK_LDGSTS / MK_ONECOPY / MK_NOCOPY are v22 knobs"
#endif
#define KP_RED (32 * 16)  // floats of one part's partials: 32 rows x 16 tokens
// The K-part warps' barrier: mk_cbar, thread 0 arriving for the warps that skip the call.
__device__ __forceinline__ void kp_sync() {
  __syncwarp();
  cbar_sync(MK_CW * 32 - 64 * MK_V23F8);
}
// One tile's FP8 K steps [kk0, kk0 + 32 ns) (elements inside the call's [k0, k0 + kc)): weights at wa (row gq;
// gq + 8 at wa + wr8), 32 bytes a step; block scales (one per 128 elements) from the rows' scale rows sp0 / sp1,
// loaded once a block, the next block's during this one (the first build loaded them every step: 17 of the
// packed loop's 52 SASS instructions).
template <int NT, bool PACKED>
__device__ __forceinline__ void steps_kp(unsigned int wa, unsigned int wr8, const uint8_t* sp0, const uint8_t* sp1,
                                         int k0, int kk0, int ns, const unsigned int (&xa)[NT], float (&acc)[NT][4]) {
  const unsigned int e0 = (unsigned int)(k0 + kk0), blk = e0 / 128u;
  const float* s0 = reinterpret_cast<const float*>(sp0) + blk;
  const float* s1 = reinterpret_cast<const float*>(sp1) + blk;
  // Blocks after the first that the steps reach, and the step's place in its block.
  int more = (int)((e0 + 32u * (unsigned int)ns - 1u) / 128u - blk);
  unsigned int kin = (e0 >> 5) & 3u;
  float fa = __ldg(s0), fb = __ldg(s1), na = fa, nb = fb;
  if (more > 0) {
    na = __ldg(s0 + 1);
    nb = __ldg(s1 + 1);
  }
  unsigned int xk = 4u * (unsigned int)kk0;
MK_PRAGMA_UNROLL(MK_V23U)
  for (int s = 0; s < ns; s++) {
    unsigned int pa[4], pb[4];
    fp8_pairs(lds64(wa), pa);
    fp8_pairs(lds64(wa + wr8), pb);
    wa += 32u;
    mma_step23<NT, PACKED>(pa, pb, xa, xk, fa, fb, acc);
    xk += 128u;
    if (++kin == 4u) {  // the next 128-element block: its scales (loaded a block ago), and the one after's
      kin = 0u;
      fa = na;
      fb = nb;
      if (--more > 0) {
        s0++;
        s1++;
        na = __ldg(s0 + 1);
        nb = __ldg(s1 + 1);
      }
    }
  }
}

// Consumer warp w < 2 MK_V23F8 of an FP8 call (see MK_V23F8): tile w & 1, K part w >> 1.
template <int NT>
__device__ __noinline__ void ring_consume_kp(const uint8_t* W, int k0, int kc, const float* xs, int nrows,
                                             float* stage, unsigned int it) {
  constexpr int KP = MK_V23F8, PITCH = RingFmt<FMT_F8>::PITCH;
  const TileRows& d = mk_tile;
  unsigned long long* const full = mk_bars;
  unsigned long long* const empty = mk_bars + RING_NS;
  const int warp = threadIdx.x >> 5, rt = warp & 1, part = warp >> 1, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int kbytes = kc, seg = min(RING_SEG, kbytes), nseg = (kbytes + seg - 1) / seg;
  const int nchunks = ((nrows + RING_ROWS - 1) / RING_ROWS) * nseg;
  const unsigned int ringb = smem_u32(mk_smem), xsb = smem_u32(xs);
  constexpr unsigned int EXTRA = MK_CW * 32 - 64 * KP;
  PH_END(2)
  RingProf23 prof;
  float acc[NT][4];
  zero_acc23(acc);
  int tn = 0, r0 = 0;
  bool packed = false;
  unsigned int xa[NT];
  const uint8_t* sp0 = W;
  const uint8_t* sp1 = W;
  int g = 0, sg = 0;
  Slot23 sl(it);
  for (int c = 0; c < nchunks; c++) {
    if (sg == 0) {
      r0 = g * RING_ROWS + rt * 16;
      // Invalid rows' scale rows are W (ring_row): readable, and their products are dropped.
      const RowInfo ra = ring_row<FMT_F8>(W, d, r0 + gq, nrows);
      const RowInfo rb = ring_row<FMT_F8>(W, d, r0 + gq + 8, nrows);
      sp0 = ra.sp;
      sp1 = rb.sp;
      tile_tokens23(d, r0, __any_sync(0xffffffffu, ra.ok || rb.ok), xsb, tn, packed, xa);
    }
    const bool lastseg = sg == nseg - 1;
    const int nks = min(seg, kbytes - sg * seg) / 32;
    const int s0 = part * nks / KP, s1 = (part + 1) * nks / KP;
    prof.wait(full + sl.slot, sl.parity);
    if (tn > 0 && s1 > s0 && !MK_NOCOMPUTE) {
      const unsigned int wa = ringb + sl.slot * RING_SLOT + (rt * 16 + gq) * PITCH + tq * 8 + s0 * 32;
      const int kk0 = sg * seg + s0 * 32;
      if constexpr (NT == 1) {
        if (packed) steps_kp<1, true>(wa, 8u * PITCH, sp0, sp1, k0, kk0, s1 - s0, xa, acc);
      }
      if (!packed) steps_kp<NT, false>(wa, 8u * PITCH, sp0, sp1, k0, kk0, s1 - s0, xa, acc);
    }
    slot_release23(empty + sl.slot, EXTRA, threadIdx.x == 0);
    sl.next();
    if (!lastseg) {
      sg++;
      continue;
    }
    sg = 0;
    float* const red = SM_MMR + (g & 1) * ((KP - 1) * KP_RED);
    g++;
    if (tn > 0) fold_packed23(packed, acc);
    // Part q >= 1's partial of this lane's row gq + 8 hr of tile rt, token j.
    auto part_at = [&](int q, int hr, int j) -> float& { return red[(q - 1) * KP_RED + (rt * 16 + gq + 8 * hr) * 16 + j]; };
    if (KP > 1 && part > 0 && tn > 0 && (!packed || tq < 2)) {
#pragma unroll
      for (int hr = 0; hr < 2; hr++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
          for (int e = 0; e < 2; e++) part_at(part, hr, nt * 8 + 2 * tq + e) = acc[nt][2 * hr + e];
    }
    if (KP > 1) kp_sync();
    if (part == 0 && tn > 0 && (!packed || tq < 2)) {
      tile_store23<NT>(d, r0, nrows, stage, [&](int nt, int hr, int e, int j) {
        float sum = acc[nt][2 * hr + e];
        for (int q = 1; q < KP; q++) sum += part_at(q, hr, j);
        return sum;
      });
    }
    zero_acc23(acc);
  }
  prof.end();
  PH_BEGIN(3)
}
#endif  // MK_V23F8

template <int FMT>
__device__ __forceinline__ void ring_dispatch_t(const uint8_t* W, int k0, int kc, const float* xs, int nrows,
                                                float* stage, int T, Smem& s) {
  const TileRows& d = mk_tile;
#if MK_DEC
  // The decoupled producer streams this call on its own (producer_main); thread 0 checks that it is the same call
  // (its identity record is published with the call's first chunk), so the two walks cannot silently disagree.
  if (ring_chunks<FMT>(kc, nrows) > 0) {
    if (threadIdx.x == 0) {
      mbar_wait(mk_bars + s.ring_it % RING_NS, (s.ring_it / RING_NS) & 1u);
      const int* r = mk_callid[s.ncall & 7];
      if (r[0] != d.c0 || r[1] != nrows || r[2] != k0 || r[3] != kc || r[4] != (int)d.w || r[5] != d.mode) __trap();
    }
    s.ncall++;
  }
#else
  const int warp = threadIdx.x >> 5;
  if (warp == MK_CW) {
    if (s.pre > 0 && (s.pre_c0 != d.c0 || s.pre_rows != nrows || s.pre_kc != kc || s.pre_k0 != k0 || s.pre_w != d.w))
      __trap();
  }
#if MK_V23F8
  if (FMT == FMT_F8) {
    if (warp == MK_CW) {
      ring_produce<FMT>(W, d, k0, kc, nrows, s.ring_it, s.pre, 1 << 30);
      __syncwarp();  // the producer's lanes reconverge before the block's next (aligned) barrier
      s.pre = 0;
    } else if (warp < 2 * MK_V23F8) {
      if (T <= 8) ring_consume_kp<1>(W, k0, kc, xs, nrows, stage, s.ring_it);
      else ring_consume_kp<2>(W, k0, kc, xs, nrows, stage, s.ring_it);
    }
    s.ring_it += ring_chunks<FMT>(kc, nrows);
    return;
  }
#endif
#if MK_V23
  if (FMT == FMT_MXFP4) {
    if (warp == MK_CW) {
      ring_produce23(W, d, k0, kc, nrows, s.ring_it, s.pre, 1 << 30);
      __syncwarp();  // the producer's lanes reconverge before the block's next (aligned) barrier
      s.pre = 0;
    } else if (warp < 4 * MK_V23S) {
      if (T <= 8) ring_consume23<1>(W, k0, kc, xs, nrows, stage, s.ring_it, ring_sring<FMT>(d, k0, kc));
      else ring_consume23<2>(W, k0, kc, xs, nrows, stage, s.ring_it, ring_sring<FMT>(d, k0, kc));
    }
    s.ring_it += v23_chunks(kc, nrows);
    return;
  }
#endif
  if (warp == MK_CW) {
    ring_produce<FMT>(W, d, k0, kc, nrows, s.ring_it, s.pre, 1 << 30);
    __syncwarp();  // the producer's lanes reconverge before the block's next (aligned) barrier
    s.pre = 0;
  } else
#endif
  if (T <= 8) {
    ring_consume<FMT, 1>(W, k0, kc, xs, nrows, stage, s.ring_it, ring_sring<FMT>(d, k0, kc));
  } else {
    ring_consume<FMT, 2>(W, k0, kc, xs, nrows, stage, s.ring_it, ring_sring<FMT>(d, k0, kc));
  }
  s.ring_it += ring_chunks<FMT>(kc, nrows);
}

// Weight formats that go through the ring and the tensor cores (their activations must be in B-fragment order,
// see xs_frag); f32 / f16 weights take the scalar path on plain floats.
__device__ __forceinline__ bool mma_fmt(int fmt) { return fmt == FMT_BF16 || fmt == FMT_F8 || fmt == FMT_MXFP4; }

// Accumulate a tile's dot products into stage (which the caller zeroes). T bounds the member counts. The tile
// descriptor is published in shared memory first. The encoder guarantees K % 32 == 0 and 16-byte aligned rows
// for the ring formats.
__device__ void rows_dot(int fmt, const uint8_t* W, const TileRows& dl, int k0, int kc, const float* xs, int nrows,
                         float* stage, int T, Smem& s) {
  if (threadIdx.x == 0) {
    mk_tile = dl;
    mk_tile.rdiv.init(dl.mode == 3 ? 2 * dl.cols : dl.mode == 2 ? moe_colsp(dl.cols) : 1);
  }
  block_sync();
  const TileRows& d = mk_tile;
  switch (fmt) {
    case FMT_BF16: ring_dispatch_t<FMT_BF16>(W, k0, kc, xs, nrows, stage, T, s); break;
    case FMT_F8: ring_dispatch_t<FMT_F8>(W, k0, kc, xs, nrows, stage, T, s); break;
    case FMT_MXFP4: ring_dispatch_t<FMT_MXFP4>(W, k0, kc, xs, nrows, stage, T, s); break;
    default: warp_rows_scalar(fmt, W, d, k0, kc, xs, nrows, stage); break;
  }
}

// Width of an activation chunk when `rows` rows of K do not all fit in shared memory: the widest multiple of 32
// (one MXFP4 piece; FP8 / bf16 pieces divide it) with rows x width <= MK_XS. rows <= 256 keeps it >= 32.
__device__ __forceinline__ int chunk_width(int K, int rows) {
  if ((long long)rows * K <= MK_XS) return K;
  const int w = MK_XS / max(rows, 1);
  // v23: whole 1024-element multiples where they fit, so that MXFP4 chunks stay tiled 512-byte segments.
  if (MK_V23 && w >= 1024) return w / 1024 * 1024;
  return max(32, w / 32 * 32);
}

// Cost of one column tile of an expert with m member rows over K columns: its weight rows stream once per K pass
// of the members' activations (one while m x K fits the activation buffer), each pass costing w, 9/8 of that
// when m > 8 needs two 8-column MMA tiles, plus the members' activation rows. MoE up: w = MK_MOE_W, K = hidden
// (1 / 2 / 4 passes for <= 4 / 8 / 16 members at K = 4096: 8 + m, 16 + m, ~36-52); expert-major MoE down: w =
// I.vd, K = the expert width. (s8r8's per-block timeline: at T = 16 blocks whose experts had 9-16 members ran
// ~2x longer than the others when these took 24 + m or 64 + m.)
#ifndef MK_MOE_W
#define MK_MOE_W 8
#endif
// MK_NT2W (experiment knob, default 9): eighths of a pass's weight when m > 8 (two MMA column tiles).
#ifndef MK_NT2W
#define MK_NT2W 9
#endif
__device__ __forceinline__ int pass_cost(int w, int K, int m) {
  const int kc = chunk_width(K, m), passes = (K + kc - 1) / kc;
  return w * passes * (m > 8 ? MK_NT2W : 8) / 8 + m;
}
__device__ __forceinline__ int moe_cost(const DInstr& I, int m) { return pass_cost(MK_MOE_W, I.k, m); }

// Block b's share of the items (u, j), u < U experts, j < n column tiles, in expert-major order, item (u, j) costing
// cost(u): the items whose cost prefix starts in [b C / G, (b + 1) C / G), balanced to within one item. Calls
// fn(u, j0, j1) for each expert with tiles j0 .. j1 - 1 in the share (contiguous).
template <class Cost, class Fn>
__device__ __forceinline__ void cost_share(int U, int n, Cost cost, Fn fn) {
  const int G = gridDim.x, b = blockIdx.x;
  long long ctot = 0;
  for (int u = 0; u < U; u++) ctot += (long long)n * cost(u);
  const long long lo = ctot * b / G, hi = ctot * (b + 1) / G;
  long long pu = 0;
  for (int u = 0; u < U && pu < hi; u++) {
    const long long w = cost(u);
    const int j0 = lo <= pu ? 0 : (int)min((long long)n, (lo - pu + w - 1) / w);
    const int j1 = (int)min((long long)n, (hi - pu + w - 1) / w);
    pu += n * w;
    if (j1 > j0) fn(u, j0, j1);
  }
}


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
// The argmax's per-warp indices: past the expert bitmap with MK_DEC (the producer may still be copying the lists).
#define MK_ARGI (MK_DEC ? IV_BITS + 16 : 0)

// Asynchronous 16-byte copies global -> shared through L2 (no registers held while in flight).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Units i < tot of 8 columns (q a row), unit i = (row j, column unit c): xs[j * xstride + 8 c ..] =
// src[row(j) * rs + k0 + 8 c ..], row(j) = list ? list[j] / div : j, as 16-byte asynchronous copies, all of a
// thread's in flight at once (one commit group; the caller waits).
__device__ __forceinline__ void copy_units(const float* src, long long rs, const int* list, int div, unsigned int tot,
                                           unsigned int q, int k0, int xstride, float* xs) {
  for (unsigned int i = threadIdx.x; i < tot; i += MK_BT) {
    const unsigned int j = i / q, c = i - j * q;
    const int row = list ? list[j] / div : (int)j;
    const float* sp = src + row * rs + k0 + 8 * c;
    float* dp = xs + j * xstride + 8 * c;
    cp_async16(dp, sp);
    cp_async16(dp + 4, sp + 4);
  }
  cp_async_commit();
}

// xs[j * xstride + kk] = src[row(j) * rs + k0 + kk] for j < nrows, kk < kc, where row(j) = list ? list[j] / div : j;
// optionally scaled by inv[row(j)] * normw[k0 + kk] (inv is per source row: per token); with frag, in B-fragment
// order (frag8). Aligned rows go in units of 8 columns, copied asynchronously (all of a thread's units in flight
// at once), then normalized and converted in place by the thread that copied them (one round trip, no barrier, and
// compact code: a register-staged form unrolled over four units was measured 4 % slower at T = 1, s13r1, from
// instruction-cache misses on this once-per-instruction path).
__device__ __noinline__ void load_rows(const float* src, long long rs, const int* list, int div, int nrows, int k0, int kc,
                          int xstride, float* xs, const float* inv, const float* normw, bool frag) {
  const bool vec = ((rs | k0 | xstride) & 3) == 0 && (kc & 7) == 0 && ((reinterpret_cast<uintptr_t>(src) & 15) == 0) &&
                   (!normw || (reinterpret_cast<uintptr_t>(normw) & 15) == 0);
  if (vec) {
    const unsigned int q = (unsigned int)kc >> 3, tot = (unsigned int)nrows * q;
    copy_units(src, rs, list, div, tot, q, k0, xstride, xs);
    // The norm weights of this thread's first unit column (every unit's when the row length divides the block).
    const unsigned int c0 = threadIdx.x % q;
    float4 g0 = make_float4(1.f, 1.f, 1.f, 1.f), g1 = g0;
    if (normw) {
      g0 = __ldg(reinterpret_cast<const float4*>(normw + k0) + 2 * c0);
      g1 = __ldg(reinterpret_cast<const float4*>(normw + k0) + 2 * c0 + 1);
    }
    cp_async_wait<0>();
    for (unsigned int i = threadIdx.x; i < tot; i += MK_BT) {
      const unsigned int j = i / q, c = i - j * q;
      float* dp = xs + j * xstride + 8 * c;
      const float4 a = reinterpret_cast<const float4*>(dp)[0], b = reinterpret_cast<const float4*>(dp)[1];
      float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      if (normw) {
        float4 h0 = g0, h1 = g1;
        if (c != c0) {
          h0 = __ldg(reinterpret_cast<const float4*>(normw + k0) + 2 * c);
          h1 = __ldg(reinterpret_cast<const float4*>(normw + k0) + 2 * c + 1);
        }
        scale8(x, inv[list ? list[j] / div : (int)j], h0, h1);
      }
      store8(dp, x, frag, (int)j);
    }
    return;
  }
  for (int i = threadIdx.x; i < nrows * kc; i += MK_BT) {
    int j = i / kc, k = i - j * kc;
    int row = list ? list[j] / div : j;
    float v = ldcg(src + row * rs + k0 + k);
    if (normw) v *= inv[row] * __ldg(normw + k0 + k);
    xs[j * xstride + k] = v;
  }
  // Rows for the tensor-core ring go into B-fragment order (see xs_frag).
  if (frag) {
    block_sync();
    xs_frag(xs, nrows, xstride, kc);
  }
}

// The resident activations of a matmul / router (T rows of K at src, row stride rs, into xs at stride K), RMS-
// normalized with normw when given and in B-fragment order with frag, in one memory round trip: every unit of 8
// columns copied asynchronously (copy_units; without a norm, all of load_rows' path), then read back by the thread
// that copied it and summed for the norm (the block reduces the sums per token, then every thread scales and
// converts its units). Three short
// loops: this runs once per instruction from a cold instruction cache (the unrolled form, ~30 KB of SASS, was
// 4 % slower at T = 1, s13r1). False (nothing done) when the rows are not 16-byte aligned; the caller then takes
// the general path.
__device__ __noinline__ bool load_resident(const float* src, long long rs, int T, int K, float eps, const float* normw,
                                           bool frag) {
  if ((rs & 3) != 0 || (K & 7) != 0 || (reinterpret_cast<uintptr_t>(src) & 15) != 0 ||
      (normw && (reinterpret_cast<uintptr_t>(normw) & 15) != 0))
    return false;
  if (!normw) {  // a plain copy and conversion: load_rows' path
    load_rows(src, rs, nullptr, 1, T, 0, K, K, SM_XS, nullptr, nullptr, frag);
    return true;
  }
  static_assert(MK_XS / 8 <= 2 * MK_CW * 32 * 8, "per-unit sums fit the partial-sum buffer");
  const unsigned int q = (unsigned int)K >> 3, tot = (unsigned int)T * q;
  copy_units(src, rs, nullptr, 1, tot, q, 0, K, SM_XS);
  cp_async_wait<0>();
  for (unsigned int i = threadIdx.x; i < tot; i += MK_BT) {
    const float4* xp = reinterpret_cast<const float4*>(SM_XS + (i / q) * K + 8 * (i % q));
    const float4 a = xp[0], b = xp[1];
    SM_MMR[i] = a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
  }
  block_sync();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < T; t += MK_BW) {
    float a = 0.f;
    for (unsigned int c = lane; c < q; c += 32) a += SM_MMR[t * q + c];
    a = warp_sum(a);
    if (lane == 0) SM_INV[t] = rsqrtf(a / K + eps);
  }
  block_sync();
  for (unsigned int i = threadIdx.x; i < tot; i += MK_BT) {
    const unsigned int j = i / q, c = i - j * q;
    float* xp = SM_XS + j * K + 8 * c;
    const float4 a = reinterpret_cast<const float4*>(xp)[0], b = reinterpret_cast<const float4*>(xp)[1];
    float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    scale8(x, SM_INV[j], __ldg(reinterpret_cast<const float4*>(normw) + 2 * c),
           __ldg(reinterpret_cast<const float4*>(normw) + 2 * c + 1));
    store8(xp, x, frag, (int)j);
  }
  return true;
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
      for (int k = 4 * threadIdx.x; k < K; k += 4 * MK_BT) {
        float4 v = *reinterpret_cast<const float4*>(SM_XS + t * xstride + k);
        a += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    } else {
      for (int k = threadIdx.x; k < K; k += MK_BT) { float v = SM_XS[t * xstride + k]; a += v * v; }
    }
    a = warp_sum(a);
    if (lane == 0) SM_RED[t * MK_BW + warp] = a;
  }
  block_sync();
  if (threadIdx.x < T) {
    float a = 0.f;
    for (int w = 0; w < MK_BW; w++) a += SM_RED[threadIdx.x * MK_BW + w];
    SM_INV[threadIdx.x] = rsqrtf(a / K + eps);
  }
  block_sync();
  if (vec) {
    // Four norm-weight loads in flight per thread before any use (one memory latency, not four).
    const unsigned int q = K / 4, tot = T * q;
    for (unsigned int i0 = threadIdx.x; i0 < tot; i0 += 4 * MK_BT) {
      float4 g[4];
#pragma unroll
      for (int u = 0; u < 4; u++) {
        const unsigned int i = i0 + u * MK_BT;
        if (i < tot) g[u] = __ldg(reinterpret_cast<const float4*>(normw) + (i % q));
      }
#pragma unroll
      for (int u = 0; u < 4; u++) {
        const unsigned int i = i0 + u * MK_BT;
        if (i < tot) {
          const unsigned int t = i / q, c = i - t * q;
          float4* x = reinterpret_cast<float4*>(SM_XS + t * xstride) + c;
          const float f = SM_INV[t];
          float4 v = *x;
          v.x *= f * g[u].x; v.y *= f * g[u].y; v.z *= f * g[u].z; v.w *= f * g[u].w;
          *x = v;
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < T * K; i += MK_BT) {
      int t = i / K, k = i - t * K;
      SM_XS[t * xstride + k] *= SM_INV[t] * __ldg(normw + k);
    }
  }
}

// inv[t] = rsqrt(mean(x[t]^2) + eps) over K, read from global memory (activations not resident in xs). Eight
// tokens at a time, each thread's 16-byte loads of all eight rows (up to four per row) issued before any use: one
// memory round trip per eight tokens and 4096 columns.
__device__ __noinline__ void rms_factors(const Params& p, Smem& s, int x, int xw, int K, float eps) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool vec = ((K | xw | x) & 3) == 0;
  for (int t0 = 0; t0 < p.T; t0 += 8) {
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (vec) {
      const unsigned int n4 = (unsigned int)K >> 2;
      for (unsigned int kb = threadIdx.x; kb < n4; kb += 4 * MK_BT) {
        // Clamped rows and columns (every element assigned on every path: registers), masked when added.
        float4 v[8][4];
#pragma unroll
        for (int q = 0; q < 8; q++)
#pragma unroll
          for (int u = 0; u < 4; u++) {
            const unsigned int k = min(kb + u * MK_BT, n4 - 1);
            v[q][u] = __ldcg(reinterpret_cast<const float4*>(p.arena + x + (long long)min(t0 + q, p.T - 1) * xw) + k);
          }
#pragma unroll
        for (int q = 0; q < 8; q++)
#pragma unroll
          for (int u = 0; u < 4; u++)
            if (kb + u * MK_BT < n4)
              a[q] += v[q][u].x * v[q][u].x + v[q][u].y * v[q][u].y + v[q][u].z * v[q][u].z + v[q][u].w * v[q][u].w;
      }
    } else {
      for (int q = 0; q < 8 && t0 + q < p.T; q++) {
        const float* row = p.arena + x + (long long)(t0 + q) * xw;
#pragma unroll 8
        for (int k = threadIdx.x; k < K; k += MK_BT) { const float v = ldcg(row + k); a[q] += v * v; }
      }
    }
#pragma unroll
    for (int q = 0; q < 8; q++) {
      if (t0 + q >= p.T) break;
      const float v = warp_sum(a[q]);
      if (lane == 0) SM_RED[(t0 + q) * MK_BW + warp] = v;
    }
  }
  block_sync();
  if (threadIdx.x < p.T) {
    float a = 0.f;
    for (int w = 0; w < MK_BW; w++) a += SM_RED[threadIdx.x * MK_BW + w];
    SM_INV[threadIdx.x] = rsqrtf(a / K + eps);
  }
  block_sync();
}

// Argmax / Gumbel-max key of logit v at vocabulary index i for token t: v itself at temperature 0, else
// v / temperature + Gumbel noise from a hash of (seed, position, index) (exact sampling from softmax(v / temp)).
__device__ __forceinline__ float sample_key(const Params& p, int t, int i, float v) {
  if (p.temperature <= 0.f) return v;
  unsigned long long h = p.seed ^ (0x9E3779B97F4A7C15ull * (unsigned long long)(p.pos[t] + 1)) ^
                         (0xD1B54A32D192ED03ull * (unsigned long long)(i + 1));
  h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
  const float uu = ((h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  return v / p.temperature - __logf(-__logf(uu));
}

// Better (key, index) of two candidates: larger key, ties to the lower index.
__device__ __forceinline__ void best_of(float& bv, int& bi, float ov, int oi) {
  if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
}

// ---------------------------------------------------------------------------------------------------------------
// MATMUL: out[t, c] = epilogue((norm?(x[t]) . W[row(c)]) + bias), one tile = `tile_rows` output columns.
// With SwiGLU the tile computes gate rows c and up rows N/2 + c.

// Rotate the RoPE pair (*a, *b) = dims (j, j + rot / 2) of a head at position pos.
__device__ __forceinline__ void rope_pair(float* a, float* b, int pos, int j, int rot, float theta) {
  float sn, cs;
  sincosf((float)pos * powf(theta, -2.f * (float)j / (float)rot), &sn, &cs);
  const float x = *a, y = *b;
  *a = x * cs - y * sn;
  *b = y * cs + x * sn;
}

__device__ void apply_rope_stage(float* st, int stride, int T, int cols, int c0, int hd, int rot, float theta,
                                 const int* pos) {
  int half = rot / 2;
  for (int i = threadIdx.x; i < T * cols; i += MK_BT) {
    int t = i / cols, c = i - t * cols;
    int cg = c0 + c;
    int j = cg % hd;
    if (j >= half) continue;
    // The pair (j, j + half) lies in the tile: tiles are head aligned when RoPE is present.
    rope_pair(st + t * stride + c, st + t * stride + c + half, pos[t], j, rot, theta);
  }
}

// Geometry of matmul tile `tile` (rows c0 .. c0 + cols of the output, gate and up rows with SwiGLU) and the K
// width of its first ring call (the whole row when the activations are resident, see prep).
__device__ __forceinline__ void matmul_geom(const Params& p, const DInstr& I, int tile, TileRows& d, int& nrows,
                                            int& kc1) {
  bool swiglu = false, rope2 = false;
  for (int q = 0; q < I.nepi; q++) {
    const int e = (I.epi >> (4 * q)) & 15;
    swiglu |= e == EPI_SWIGLU;
    rope2 |= e == EPI_ROPE2;
  }
  const int outn = swiglu ? I.n / 2 : I.n;  // output columns
  int c0 = tile * I.tile_rows, cols = min(I.tile_rows, outn - c0), split = swiglu ? I.n / 2 : 0;
  nrows = swiglu ? 2 * cols : cols;  // weight rows computed
  if (rope2) {
    // Split-pair RoPE tiles of R = tile_rows rows (the encoder checks R | rotary, R | head_dim - rotary): a head's
    // rotary dims make rotary / R tiles, each R / 2 rotated pairs (j, j + rotary / 2) as the rows c0 .. c0 + R/2
    // and c0 + rotary/2 .. (the SwiGLU gate / up split of TileRows), then its other dims plain R-row tiles. Every
    // tile has R rows, so the q projection splits into head_dim / R tiles per head instead of head-aligned ones.
    const int R = I.tile_rows, per = I.hd / R, nrot = I.rotary / R;
    const int h = tile / per, th = tile - h * per;
    if (th < nrot) {
      c0 = h * I.hd + th * (R / 2); cols = R / 2; split = I.rotary / 2;
    } else {
      c0 = h * I.hd + I.rotary + (th - nrot) * R; cols = R; split = 0;
    }
    nrows = R;
  }
  d = TileRows{};
  d.mode = 0; d.c0 = c0; d.cols = cols; d.split = split; d.w = I.w; d.ws = I.ws; d.K = I.k; d.n = p.T;
  d.sstride = 2 * I.tile_rows;
  kc1 = (long long)p.T * I.k <= MK_XS ? I.k : min(I.k, chunk_width(I.k, p.T));
}

// v22 (s19r2-s19r4): every prefetch issues MK_PFN chunks ahead (was RING_NS, all the slots: the producer's issue is
// cold serial code, and the consumers wait for it at the barrier after a short dependency wait), and op_matmul no
// longer prefetches the block's next tile (the producer issued it before the tile's closing barrier once the
// consumers freed the slots, so the epilogue waited for it; removed, see commit 34b8fd2's MK_NTPF). H100, same call
// (s19r3): T = 1 / 4 / 8 / 16 9.578 / 13.830 / 20.551 / 32.497 ms vs 9.677 / 13.851 / 20.680 / 32.600.
// MK_WPF=0 (experiment knob) drops the prefetch during the dependency wait (s19r2: T = 1 +2.4 %).
#ifndef MK_PFN
#define MK_PFN 2
#endif
#ifndef MK_WPF
#define MK_WPF 1
#endif
// Producer warp: issue the first ring chunks of the block's next ring call (weight rows of `d`, columns
// [k0, k0 + kc)) ahead of it, into slots the block's previous ring call released; the call checks the identity.
// Weights do not depend on activations, so this overlaps dependency waits and the previous tile's epilogue.
__device__ __forceinline__ void prefetch_call(const Params& p, Smem& s, int fmt, const TileRows& d, int k0, int kc,
                                           int nrows) {
  int n = 0;
  // MK_PHASE=6: the producer's time issuing prefetches (its lane 0 reports instead of thread 0).
  const unsigned long long tpf = MK_PHASE == 6 && mk_prof_on && threadIdx.x == MK_CW * 32 ? gtimer() : 0ull;
  switch (fmt) {
    case FMT_BF16: n = ring_produce<FMT_BF16>(p.weights, d, k0, kc, nrows, s.ring_it, 0, MK_PFN); break;
    case FMT_F8: n = ring_produce<FMT_F8>(p.weights, d, k0, kc, nrows, s.ring_it, 0, MK_PFN); break;
#if MK_V23
    case FMT_MXFP4: n = ring_produce23(p.weights, d, k0, kc, nrows, s.ring_it, 0, MK_PFN); break;
#else
    case FMT_MXFP4: n = ring_produce<FMT_MXFP4>(p.weights, d, k0, kc, nrows, s.ring_it, 0, MK_PFN); break;
#endif
    default: break;
  }
  __syncwarp();  // the producer's lanes reconverge before the block's next (aligned) barrier
  s.pre = n; s.pre_c0 = d.c0; s.pre_rows = nrows; s.pre_kc = kc; s.pre_k0 = k0; s.pre_w = d.w;
  if (tpf) mk_stat[4] += gtimer() - tpf;
}

// Producer warp: issue the first chunks of matmul tile `tile`'s first ring call ahead of it. Weights do not depend
// on activations, so this runs while the block waits for the instruction's producers (or finishes the previous
// tile's epilogue); the slots it fills were released by the block's previous ring call.
__device__ __noinline__ void prefetch_matmul(const Params& p, Smem& s, const DInstr& I, int tile) {
  TileRows d;
  int nrows, kc;
  matmul_geom(p, I, tile, d, nrows, kc);
  prefetch_call(p, s, I.fmt, d, 0, kc, nrows);
}

// Element i of a small f32 / bf16 / f16 weight.
__device__ __forceinline__ float wel(int fmt, const uint8_t* W, long long i) {
  if (fmt == FMT_F32) return __ldg(reinterpret_cast<const float*>(W) + i);
  const unsigned short u = __ldg(reinterpret_cast<const unsigned short*>(W) + i);
  return fmt == FMT_BF16 ? __uint_as_float((unsigned int)u << 16) : __half2float(__ushort_as_half(u));
}

// Fused router (a matmul with E > 0, see kernels/src/device.rs `FusedRouter`): this tile's share of the next
// router's logits over its output columns, part[tile][t][e] = sum_c W_r[e][col] g[col] h[t][c] (c ascending),
// and of each token's sum of squares, ss[tile][t] = sum_c h[t][c]^2, from the final stage h. The MoE
// instructions add the tiles' shares in tile order and scale the logits by 1 / rms. W_r (g folded in) goes
// through shared memory after the stage at a pitch of width + 1 (conflict-free per-expert rows). The encoder fuses
// only plain matmuls, whose tile columns are c0 .. c0 + width - 1. (The tile's TileRows is not passed: a reference
// to it would keep op_matmul's copy in local memory, which its epilogue loops then read element by element.)
__device__ __noinline__ void router_partials(const Params& p, const DInstr& I, int c0, int tile, int width,
                                             int sstride) {
  const int E = I.E, T = p.T, cp = width + 1, K = I.n;
  float* gw = SM_STAGE + T * sstride;
  const uint8_t* wr = p.weights + I.w2;
  const float* g = I.sinks >= 0 ? reinterpret_cast<const float*>(p.weights + I.sinks) : nullptr;
  MK_COLD_LOOP for (int i = threadIdx.x; i < E * width; i += MK_BT) {
    const int e = i / width, c = i - e * width, col = c0 + c;
    const float w = wel(I.inter, wr, (long long)e * K + col);
    gw[e * cp + c] = g ? w * __ldg(g + col) : w;
  }
  block_sync();
  float* part = p.scratch + I.ws2 + (long long)tile * T * E;
  MK_COLD_LOOP for (int i = threadIdx.x; i < T * E; i += MK_BT) {
    const int t = i / E, e = i - t * E;
    const float* h = SM_STAGE + t * sstride;
    const float* w = gw + e * cp;
    float a = 0.f;
    for (int c = 0; c < width; c++) a += w[c] * h[c];
    part[i] = a;
  }
  float* ss = p.scratch + I.ws2 + (long long)I.ntiles * T * E + (long long)tile * T;
  MK_COLD_LOOP for (int t = threadIdx.x; t < T; t += MK_BT) {
    const float* h = SM_STAGE + t * sstride;
    float a = 0.f;
    for (int c = 0; c < width; c++) a += h[c] * h[c];
    ss[t] = a;
  }
}

// Bias, epilogue stages and outputs of matmul tile `tile`, whose dot products are in st (T rows at the tile's
// stage stride); the geometry is recomputed here (a TileRows passed by reference would live in local memory).
__device__ __noinline__ void matmul_finish(const Params& p, const DInstr& I, int tile, float* st) {
  TileRows d;
  int nrows, kc1;
  matmul_geom(p, I, tile, d, nrows, kc1);
  const int c0 = d.c0, cols = d.cols, sstride = d.sstride;
  // Bias.
  if (I.bias >= 0) {
    const float* b = reinterpret_cast<const float*>(p.weights + I.bias);
    MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * nrows; i += MK_BT) {
      int t = i / nrows, rr = i - t * nrows;
      st[t * sstride + rr] += __ldg(b + d.map(rr));
    }
    block_sync();
  }
  // Epilogue stages in order.
  int width = nrows;
  for (int q = 0; q < I.nepi; q++) {
    int e = (I.epi >> (4 * q)) & 15;
    if (e == EPI_SCALE) {
      MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * width; i += MK_BT) {
        int t = i / width, c = i - t * width;
        st[t * sstride + c] *= I.scale;
      }
    } else if (e == EPI_ROPE) {
      apply_rope_stage(st, sstride, p.T, width, c0, I.hd, I.rotary, I.theta, p.pos);
    } else if (e == EPI_ROPE2) {
      if (d.split) {  // a rotary tile: stage columns c and c + cols are the pair (j, j + rotary / 2)
        MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * cols; i += MK_BT) {
          const int t = i / cols, c = i - t * cols;
          float* sp = st + t * sstride + c;
          rope_pair(sp, sp + cols, p.pos[t], (c0 + c) % I.hd, I.rotary, I.theta);
        }
      }
    } else if (e == EPI_KVWRITE) {
      float* base = p.kv + (I.kvkind == 0 ? I.kv_k : I.kv_v);
      int rowlen = I.heads * I.hd;
      MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * width; i += MK_BT) {
        int t = i / width, c = i - t * width;
        int slot = p.pos[t] % I.kv_cap;
        base[(long long)slot * rowlen + d.map(c)] = st[t * sstride + c];
      }
    } else if (e == EPI_SWIGLU) {
      MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * cols; i += MK_BT) {
        int t = i / cols, c = i - t * cols;
        float g = st[t * sstride + c], u = st[t * sstride + cols + c];
        st[t * sstride + c] = silu_f(g) * u;
      }
      width = cols;
    } else if (e == EPI_RESIDUAL) {
      MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * width; i += MK_BT) {
        int t = i / width, c = i - t * width;
        st[t * sstride + c] += ldcg(p.arena + I.res + (long long)t * I.resw + d.map(c));
      }
    }
    block_sync();
  }
  // Output columns: the stage's width after the epilogues (SwiGLU halves it) at their map (split-pair RoPE tiles
  // are two column runs).
  if (I.out >= 0) {
    MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * width; i += MK_BT) {
      int t = i / width, c = i - t * width;
      p.arena[I.out + (long long)t * I.outw + d.map(c)] = st[t * sstride + c];
    }
  }
  // The fused router's partials use the stage past the tile (op_matmul runs those, with st = SM_STAGE).
  if (I.E > 0) router_partials(p, I, c0, tile, width, sstride);
  // LM head with in-kernel sampling: each tile leaves its best (key, index) per token in scratch[aux], so the
  // argmax instruction only compares one candidate per tile.
  if (I.aux >= 0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int t = warp; t < p.T; t += MK_BW) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      MK_COLD_LOOP for (int c = lane; c < cols; c += 32)
        best_of(bv, bi, sample_key(p, t, c0 + c, st[t * sstride + c]), c0 + c);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
        best_of(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
      if (lane == 0) {
        float* r = p.scratch + I.aux + 2ll * ((long long)t * I.ntiles + tile);
        r[0] = bv;
        r[1] = __int_as_float(bi);
      }
    }
  }
}

__device__ __noinline__ void op_matmul(const Params& p, Smem& s, const DInstr& I, int tile) {
  TileRows d;
  int nrows, kc1;
  matmul_geom(p, I, tile, d, nrows, kc1);
  const int sstride = d.sstride;
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  PH_BEGIN(2)
  for (int i = threadIdx.x; i < p.T * sstride; i += MK_BT) SM_STAGE[i] = 0.f;
  if (mk_flags[0]) {
    d.xstride = I.k;
    block_sync();
    rows_dot(I.fmt, p.weights, d, 0, I.k, SM_XS, nrows, SM_STAGE, p.T, s);
  } else {
    const int kcw = chunk_width(I.k, p.T);
    d.xstride = kcw;
    for (int k0 = 0; k0 < I.k; k0 += kcw) {
      int kc = min(kcw, I.k - k0);
      block_sync();
      load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, k0, kc, kcw, SM_XS, SM_INV, normw, mma_fmt(I.fmt));
      block_sync();
      rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, nrows, SM_STAGE, p.T, s);
    }
  }
  block_sync();
  PH_END(3)
  PH_BEGIN(4)
  matmul_finish(p, I, tile, SM_STAGE);
  PH_END(4)
}

// K-outer matmul (s15r1, H100: T = 16 matmul path 12.66 -> 12.36 ms alone, part of v17): when the activations do
// not fit in shared memory (T x K > MK_XS, i.e. T >= 8 at K = 4096) and the block holds several tiles of the
// instruction, the tiles go in batches that the stage holds and the K chunks run outside the tiles: each chunk's
// activations load once per batch instead of once per tile, and the producer issues every next ring call's first
// chunks (next tile, or the next chunk's first tile) while the consumers finish the current one, so the ring does not
// drain between the short calls (at T = 16 one FP8 chunk per call). Plain matmuls only (no fused router: its partials
// need the stage past the tile).
// resident: the activations are in shared memory whole (prep's mk_flags[0]; a reference, read only when needed).
__device__ __forceinline__ bool matmul_kouter(const Params& p, const DInstr& I, int first, int ntiles,
                                              const int& resident) {
  return I.op == OP_MATMUL && mma_fmt(I.fmt) && I.ntiles > 0 && I.E == 0 && !resident &&
         first + (int)gridDim.x < ntiles && 2 * p.T * 2 * I.tile_rows <= MK_STAGE;
}
__device__ __noinline__ void op_matmul_kouter(const Params& p, Smem& s, const DInstr& I, int first, int ntiles) {
  const int G = gridDim.x, T = p.T, per = T * 2 * I.tile_rows;  // a tile's stage: T rows at 2 x tile_rows
  const int B = MK_STAGE / per, kcw = chunk_width(I.k, T);
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  const bool producer = !MK_DEC && (threadIdx.x >> 5) == MK_CW;
  for (int t0 = first; t0 < ntiles; t0 += B * G) {
    const int nb = min(B, (ntiles - t0 + G - 1) / G);
    for (int i = threadIdx.x; i < nb * per; i += MK_BT) SM_STAGE[i] = 0.f;
    for (int k0 = 0; k0 < I.k; k0 += kcw) {
      const int kc = min(kcw, I.k - k0);
      block_sync();
      load_rows(p.arena + I.x, I.xw, nullptr, 1, T, k0, kc, kcw, SM_XS, SM_INV, normw, true);
      for (int j = 0; j < nb; j++) {
        TileRows d;
        int nrows, kc1;
        matmul_geom(p, I, t0 + j * G, d, nrows, kc1);
        d.xstride = kcw;
        block_sync();  // the activations are in; the previous call's consumers are done with mk_tile
        rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, nrows, SM_STAGE + j * per, T, s);
        if (producer) {
          // The next call: the batch's next tile at this chunk, else its first tile at the next chunk, else the
          // next batch's first tile at chunk 0.
          int nt = t0 + (j + 1) * G, nk0 = k0;
          if (j + 1 == nb) {
            nt = t0;
            nk0 = k0 + kcw;
            if (nk0 >= I.k) {
              nt = t0 + nb * G;
              nk0 = 0;
            }
          }
          if (nt < ntiles) {
            TileRows dn;
            int nrn, kcn;
            matmul_geom(p, I, nt, dn, nrn, kcn);
            prefetch_call(p, s, I.fmt, dn, nk0, min(kcw, I.k - nk0), nrn);
          }
        }
      }
    }
    block_sync();
    for (int j = 0; j < nb; j++) {
      matmul_finish(p, I, t0 + j * G, SM_STAGE + j * per);
      block_sync();
    }
  }
}

// Arrival counters of split computations: the block's results are written and ordered by a barrier (all threads,
// before the call); thread i < cnt counts the block in on ctr[i] and, when it is the n-th arrival, resets that
// counter for the next instruction. last[i] is true in every thread when this block was the last to arrive on
// ctr[i] (and then combines those splits).
__device__ __forceinline__ void arrivals(unsigned int* ctr, int cnt, unsigned int n, int* last) {
  if ((int)threadIdx.x < cnt) {
    unsigned int* c = ctr + threadIdx.x;
    __threadfence();
    const bool lst = atomicAdd(c, 1u) == n - 1;
    if (lst) {
      atomicExch(c, 0u);
      __threadfence();
    }
    last[threadIdx.x] = lst;
  }
  block_sync();
}
// One counter: true in every thread of the last block to arrive.
__device__ __forceinline__ bool last_arrival(unsigned int* ctr, unsigned int n) {
  arrivals(ctr, 1, n, mk_flags + 2);
  return mk_flags[2];
}

// ---------------------------------------------------------------------------------------------------------------
// Attention, grouped by kv head. Tile = (token, kv head, head group, split): up to MK_WARPS query heads that share
// a kv head (one per warp) read each K / V row once, from shared memory, instead of once per head. When the
// forward has fewer (token, kv head, group) triples than blocks, each one's visible positions are split into S
// contiguous ranges on different blocks; each split leaves its heads' unnormalized (max, sum, output) in scratch
// and the last split to finish (an arrival counter) combines them in split order (deterministic) with the sinks.
// At most ATTN_SMAX splits (s15r2, H100: 8 instead of 16 took the T = 1 attention path 860 -> 787 us: fewer
// partials to combine; the encoder's ATTN_SPLITS sizes the partials for it).
#ifndef ATTN_SMAX
#define ATTN_SMAX 8
#endif
// A split's partial: max, sum, two unused floats, then the vd outputs (16-byte aligned: the encoder aligns the
// partials and vd % 4 == 0).
#define APS(vd) ((vd) + 4)
static_assert(MK_XS >= 2 * 4 * 516, "two chunks of four K / V rows (head dims up to 256) fit the activation buffer");
__device__ __forceinline__ int attn_groups(const DInstr& I) { return (I.nh / I.nkv + MK_BW - 1) / MK_BW; }
__device__ __forceinline__ int attn_splits(int T, const DInstr& I) {
  return max(1, min(ATTN_SMAX, (int)gridDim.x / (T * I.nkv * attn_groups(I))));
}

// K / V rows of positions [j0, j0 + n) of kv head kvh into shared memory (kb: n rows at pitch kp, vb: n x vd),
// 16-byte asynchronous copies through L2 (one commit group per call): a warp per position row, lanes over its
// 16-byte units (no division per copy; the slot's modulo once per call).
__device__ __forceinline__ void attn_stage(const Params& p, const DInstr& I, int kvh, int j0, int n, float* kb,
                                           float* vb, int kp) {
  const int qd = I.qd, vd = I.vd, kq = qd / 4, vq = vd / 4;
  const float* K = p.kv + I.kv_k;
  const float* V = p.kv + I.kv_v;
  const long long krow = (long long)I.nkv * qd, vrow = (long long)I.nkv * vd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, s0 = j0 % I.kv_cap;
  for (int r = warp; r < n; r += MK_BW) {
    int slot = s0 + r;
    while (slot >= I.kv_cap) slot -= I.kv_cap;
    const float* ks = K + slot * krow + kvh * qd;
    const float* vs = V + slot * vrow + kvh * vd;
    for (int c = lane; c < kq + vq; c += 32) {
      if (c < kq) cp_async16(kb + r * kp + 4 * c, ks + 4 * c);
      else cp_async16(vb + r * vd + 4 * (c - kq), vs + 4 * (c - kq));
    }
  }
  cp_async_commit();
}

// A chunk of K / V rows in shared memory: the K row pitch kp (an odd number of 16-byte units, so eight rows' LDS.128
// fall in distinct banks) and the positions per chunk ch (two chunks fit the activation buffer).
__device__ __forceinline__ void attn_chunk(int qd, int vd, int& kp, int& ch) {
  kp = ((qd >> 2) & 1) ? qd : qd + 4;
  ch = min(32, MK_XS / (2 * (kp + vd))) & ~3;
}

__device__ __forceinline__ float4 lds128f(unsigned int a) {
  const uint4 v = lds128(a);
  return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
}

// Warp w takes head g0 + w of kv head kvh's group over positions [a, b], which stream through two shared-memory
// buffers (the next chunk's copies in flight while this one is read). Lanes over positions: lane j scores
// position j of a chunk (a float4 dot product against the warp's query row, pre-scaled and held in shared memory,
// read as broadcasts; K rows at an odd pitch of 16-byte units, so the lanes' LDS.128 of eight rows fall in
// distinct banks), then one online-softmax update per chunk (warp max and sum), and the value rows (lanes over
// the VU x 32 value dims) accumulated with each position's weight by shuffle. About 31 SASS instructions per
// position and head (the lanes-over-dims form: ~81, a five-shuffle sum and a serial update per position).
template <int VU>
__device__ void attn_head(const Params& p, const DInstr& I, int t, int kvh, int g0, int a, int b, bool pre, float& m,
                          float& l, float (&o)[VU]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = I.nh / I.nkv, qd = I.qd, vd = I.vd;
  int kp, ch;
  attn_chunk(qd, vd, kp, ch);
  float* qs = SM_STAGE + warp * qd;  // the attention instruction leaves the stage unused
  const float* q = p.arena + I.x + (long long)t * I.xw + (long long)(kvh * G + min(g0 + warp, G - 1)) * qd;
  for (int k = lane; k < qd; k += 32) qs[k] = ldcg(q + k) * I.scale;
  __syncwarp();
  const unsigned int qsb = smem_u32(qs);
  m = -INFINITY;
  l = 0.f;
#pragma unroll
  for (int u = 0; u < VU; u++) o[u] = 0.f;
  float* buf[2] = {SM_XS, SM_XS + ch * (kp + vd)};
  if (a <= b && !pre) attn_stage(p, I, kvh, a, min(ch, b - a + 1), buf[0], buf[0] + ch * kp, kp);
  for (int j0 = a, c = 0; j0 <= b; j0 += ch, c++) {
    const int n = min(ch, b - j0 + 1);
    if (j0 + ch <= b) {
      float* nb = buf[(c + 1) & 1];
      attn_stage(p, I, kvh, j0 + ch, min(ch, b - j0 - ch + 1), nb, nb + ch * kp, kp);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    block_sync();
    const unsigned int kbs = smem_u32(buf[c & 1]), vbs = kbs + 4u * (unsigned int)(ch * kp);
    const unsigned int kr = kbs + 4u * (unsigned int)(min(lane, n - 1) * kp);  // lanes past n: dropped below
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll 4
    for (int k = 0; k < qd; k += 4) {
      const float4 qv = lds128f(qsb + 4u * k), kv = lds128f(kr + 4u * k);
      s0 += qv.x * kv.x;
      s1 += qv.y * kv.y;
      s2 += qv.z * kv.z;
      s3 += qv.w * kv.w;
    }
    const float d = lane < n ? (s0 + s1) + (s2 + s3) : -INFINITY;
    const float mn = fmaxf(m, warp_max(d));
    const float cc = __expf(m - mn);
    const float e = lane < n ? __expf(d - mn) : 0.f;
    l = l * cc + warp_sum(e);
#pragma unroll
    for (int u = 0; u < VU; u++) o[u] *= cc;
    unsigned int vr = vbs + 4u * lane;
#pragma unroll 4
    for (int j = 0; j < n; j++, vr += 4u * vd) {
      const float ej = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
      for (int u = 0; u < VU; u++)
        if (lane + 32 * u < vd) o[u] += ej * __uint_as_float(lds32(vr + 128u * u));
    }
    m = mn;
    block_sync();  // the buffer is refilled two chunks on
  }
}

// Attention tile `tile`: its token t, kv head, first head g0 of its group, split sp of S, and positions [a, b].
__device__ __forceinline__ void attn_geom(const Params& p, const DInstr& I, int tile, int& t, int& kvh, int& g0,
                                          int& sp, int& a, int& b) {
  const int S = attn_splits(p.T, I), NG = attn_groups(I);
  const int tg = tile / S;
  sp = tile - tg * S;
  const int tk = tg / NG;
  g0 = (tg - tk * NG) * MK_BW;
  t = tk / I.nkv;
  kvh = tk - t * I.nkv;
  const int P = p.pos[t];
  const int lo = I.window > 0 ? max(0, P + 1 - I.window) : 0;
  const int per = (P - lo + S) / S;  // positions per split (ceil)
  a = lo + sp * per;
  b = min(P, a + per - 1);
}

// MK_ASTAGE (experiment knob): the K / V rows of a block's first attention tile's first chunk are copied into
// shared memory before the instruction's dependency wait when they all precede this forward's first position
// (p.pos is ascending and consecutive: those rows were written by earlier forwards and this forward's KV writes
// cannot reach their slots, see the encoder's KV capacity), so their latency overlaps the wait for q / k / v.
#ifndef MK_ASTAGE
#define MK_ASTAGE 0
#endif
// Whether tile `tile`'s first chunk may be staged before the wait (and, staged, it is: attn_head skips it).
__device__ __forceinline__ bool attn_prestage(const Params& p, const DInstr& I, int tile, bool issue) {
  int t, kvh, g0, sp, a, b;
  attn_geom(p, I, tile, t, kvh, g0, sp, a, b);
  int kp, ch;
  attn_chunk(I.qd, I.vd, kp, ch);
  const int n = min(ch, b - a + 1);
  const bool ok = a <= b && a + n <= p.pos[0];
  if (ok && issue) attn_stage(p, I, kvh, a, n, SM_XS, SM_XS + ch * kp, kp);
  return ok;
}

template <int VU>
__device__ __forceinline__ void attn_tile(const Params& p, const DInstr& I, int tile, bool pre) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int S = attn_splits(p.T, I);
  int t, kvh, g0, sp, a, b;
  attn_geom(p, I, tile, t, kvh, g0, sp, a, b);
  const int G = I.nh / I.nkv, vd = I.vd, ng = min(MK_BW, G - g0);
  const float* sinks = I.sinks >= 0 ? reinterpret_cast<const float*>(p.weights + I.sinks) : nullptr;
  const int th0 = t * I.nh + kvh * G + g0;  // (token, head) index of the tile's first head
  float m, l, o[VU];
  attn_head<VU>(p, I, t, kvh, g0, a, b, pre, m, l, o);
  if (warp < ng) {
    if (S == 1) {
      const float sink = sinks ? __ldg(sinks + kvh * G + g0 + warp) : -INFINITY;
      const float Mall = fmaxf(m, sink);
      const float f = __expf(m - Mall);
      const float Lall = l * f + (sinks ? __expf(sink - Mall) : 0.f);
      const float sc = f / Lall;  // one division (per element, an IEEE division is a ~30-instruction subroutine)
      float* out = p.arena + I.out + (long long)t * I.outw + (long long)(kvh * G + g0 + warp) * vd;
#pragma unroll
      for (int u = 0; u < VU; u++)
        if (lane + 32 * u < vd) out[lane + 32 * u] = o[u] * sc;
    } else {
      // Partial of split sp at scratch[I.aux + ((t * nh + h) * S + sp) * APS(vd)]: max, sum, (2 unused), output.
      float* part = p.scratch + I.aux + (long long)(th0 + warp) * S * APS(vd) + sp * APS(vd);
      if (lane == 0) { part[0] = m; part[1] = l; }
#pragma unroll
      for (int u = 0; u < VU; u++)
        if (lane + 32 * u < vd) part[4 + lane + 32 * u] = o[u];
    }
  }
  if (S == 1) return;
  block_sync();
  unsigned int* ctr = reinterpret_cast<unsigned int*>(p.scratch + I.aux) - 1 - th0;  // counters below the partials
  if (!last_arrival(ctr, S)) return;
  // Warp w combines head g0 + w: the overall max (with the sink) and sum, then its outputs, splits in order.
  if (warp >= ng) return;
  const float* part = p.scratch + I.aux + (long long)(th0 + warp) * S * APS(vd);
  const float sink = sinks ? __ldg(sinks + kvh * G + g0 + warp) : -INFINITY;
  float* out = p.arena + I.out + (long long)t * I.outw + (long long)(kvh * G + g0 + warp) * vd;
  // Lane k < S holds split k's max and sum; lane j combines dims 4j .. 4j + 3 (+ 128 h) of every split, loaded as
  // float4 together with the maxima and sums (one round trip, ~S x VU / 4 wide loads instead of S x VU scalar
  // ones: the combine runs once per layer from a cold instruction cache).
  constexpr int NV = VU / 4;
  float4 po[ATTN_SMAX][NV];
#pragma unroll
  for (int k = 0; k < ATTN_SMAX; k++)
#pragma unroll
    for (int h = 0; h < NV; h++)
      po[k][h] = k < S && 4 * lane + 128 * h < vd
                     ? __ldcg(reinterpret_cast<const float4*>(part + k * APS(vd) + 4 + 128 * h) + lane)
                     : make_float4(0.f, 0.f, 0.f, 0.f);
  const float2 hl = lane < S ? __ldcg(reinterpret_cast<const float2*>(part + lane * APS(vd))) : make_float2(0.f, 0.f);
  const float Mall = fmaxf(sink, warp_max(hl.y > 0.f ? hl.x : -INFINITY));
  const float wk = hl.y > 0.f ? __expf(hl.x - Mall) : 0.f;  // each split's weight
  const float Lall = warp_sum(hl.y * wk) + (sinks ? __expf(sink - Mall) : 0.f);
  float4 acc[NV];
#pragma unroll
  for (int h = 0; h < NV; h++) acc[h] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int k = 0; k < ATTN_SMAX; k++) {
    const float w = __shfl_sync(0xffffffffu, wk, k);
#pragma unroll
    for (int h = 0; h < NV; h++) {
      acc[h].x += po[k][h].x * w;
      acc[h].y += po[k][h].y * w;
      acc[h].z += po[k][h].z * w;
      acc[h].w += po[k][h].w * w;
    }
  }
  const float inv = 1.f / Lall;
#pragma unroll
  for (int h = 0; h < NV; h++) {
    const int e = 4 * lane + 128 * h;
    if (e < vd) {
      out[e] = acc[h].x * inv;
      out[e + 1] = acc[h].y * inv;
      out[e + 2] = acc[h].z * inv;
      out[e + 3] = acc[h].w * inv;
    }
  }
}

// Value head dims up to 128 (four per lane) or 256.
// pre: the tile's first chunk is already in flight (MK_ASTAGE).
__device__ __noinline__ void op_attn(const Params& p, Smem& s, const DInstr& I, int tile, bool pre) {
  if (I.vd <= 128) attn_tile<4>(p, I, tile, pre);
  else attn_tile<8>(p, I, tile, pre);
}

// ---------------------------------------------------------------------------------------------------------------
// Router logits, spread over blocks. Tile = (row tile rt, K split ks): the logits of experts
// [rt * tile_rows, + tile_rows) over columns [ks * n, + n) for every token, written as partial sums to
// scratch[w2 + (ks * T + t) * E + e]. The MoE instructions add the splits in order and pick the experts
// themselves (route_tokens), so routing costs no single-block step on the critical path. A fused RMSNorm
// prologue normalizes the activations as they load (prep computed each token's factor).
// Geometry of router tile `tile`: its weight rows and K split (the activation side is set by op_router).
__device__ __forceinline__ void router_geom(const Params& p, const DInstr& I, int tile, TileRows& d, int& k0, int& kc,
                                            int& rows) {
  const int nks = (int)I.ws2;
  const int rt = tile / nks, ks = tile - rt * nks;
  k0 = ks * I.n;
  kc = min(I.n, I.k - k0);
  const int r0 = rt * I.tile_rows;
  rows = min(I.tile_rows, I.E - r0);
  d = TileRows{};
  d.mode = 0; d.c0 = r0; d.cols = rows; d.split = 0; d.w = I.w; d.ws = I.ws; d.K = I.k; d.n = p.T;
  d.sstride = I.tile_rows;
}

// Producer warp: the first chunks of router tile `tile` while the block waits for the router's input.
__device__ __noinline__ void prefetch_router(const Params& p, Smem& s, const DInstr& I, int tile) {
  TileRows d;
  int k0, kc, rows;
  router_geom(p, I, tile, d, k0, kc, rows);
  prefetch_call(p, s, I.fmt, d, k0, kc, rows);
}

__device__ __noinline__ void op_router(const Params& p, Smem& s, const DInstr& I, int tile) {
  TileRows d;
  int k0, kc, rows;
  router_geom(p, I, tile, d, k0, kc, rows);
  const int r0 = d.c0;
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  const float* xs = SM_XS + k0;  // resident rows (prep): row t at t * I.k, this split's columns from k0
  int xstride = I.k;
  if (!mk_flags[0]) {
    block_sync();
    load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, k0, kc, kc, SM_XS, SM_INV, normw, mma_fmt(I.fmt));
    xs = SM_XS;
    xstride = kc;
  }
  for (int i = threadIdx.x; i < p.T * I.tile_rows; i += MK_BT) SM_STAGE[i] = 0.f;
  block_sync();
  d.xstride = xstride;
  rows_dot(I.fmt, p.weights, d, k0, kc, xs, rows, SM_STAGE, p.T, s);
  block_sync();
  float* part = p.scratch + I.w2 + (long long)(k0 / I.n) * p.T * I.E;  // this K split's partial logits
  for (int i = threadIdx.x; i < p.T * rows; i += MK_BT) {
    const int t = i / rows, r = i - t * rows;
    part[t * I.E + r0 + r] = SM_STAGE[t * I.tile_rows + r];
  }
}

// Routing of token t by one warp from its logits lg[E] (overwritten with the scores); ch[E] is scratch. Scores:
// sigmoid or softmax; choice = score + correction bias; group limit (a group's score is the sum of its top-2
// choices; the best topk_group groups stay); top-k by choice (ties: lowest index); weights are the chosen scores,
// normalized if norm_topk and scaled. raw[k] = expert, rw[k] = weight.
__device__ void route_token(const DInstr& I, const float* bias, float* lg, float* ch, float* gs, int* raw, float* rw) {
  const int lane = threadIdx.x & 31, E = I.E;
  if (I.sigmoid) {
    MK_COLD_LOOP for (int e = lane; e < E; e += 32) lg[e] = 1.f / (1.f + __expf(-lg[e]));
  } else {
    float mx = -INFINITY;
    MK_COLD_LOOP for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lg[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    MK_COLD_LOOP for (int e = lane; e < E; e += 32) { lg[e] = __expf(lg[e] - mx); sum += lg[e]; }
    sum = warp_sum(sum);
    MK_COLD_LOOP for (int e = lane; e < E; e += 32) lg[e] /= sum;
  }
  __syncwarp();
  MK_COLD_LOOP for (int e = lane; e < E; e += 32) ch[e] = lg[e] + (bias ? __ldg(bias + e) : 0.f);
  __syncwarp();
  if (I.ngroup > 1) {
    const int per = E / I.ngroup;
    if (lane < I.ngroup) {
      float b1 = -INFINITY, b2 = -INFINITY;
      MK_COLD_LOOP for (int e = lane * per; e < (lane + 1) * per; e++) {
        const float v = ch[e];
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
  float wsum = 0.f;
  for (int k = 0; k < I.topk; k++) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    MK_COLD_LOOP for (int e = lane; e < E; e += 32) {
      const float v = ch[e];
      if (v > bv || (v == bv && e < bi)) { bv = v; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    __syncwarp();  // every lane's reads of ch before lane 0 removes the winner (racecheck: warp-level WAR)
    if (lane == 0) {
      raw[k] = bi;
      rw[k] = lg[bi];
      wsum += lg[bi];
      ch[bi] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int k = 0; k < I.topk; k++) {
      float v = rw[k];
      if (I.normtopk) v /= (wsum + 1e-20f);
      rw[k] = v * I.rscale;
    }
  }
  __syncwarp();
}

// Every token's routing from the router's partial logits (splits added in order), a warp per token; block 0 also
// writes the routing buffer (expert ids as floats, then weights), as the CPU interpreter's router does.
// A fused router (I.ws2 < 0: -(splits)) left, after its splits' partial logits, each split's per-token sums of
// squares: its logits are scaled by 1 / rms (K = I.qd, eps = I.theta), and SM_INV holds those factors for the
// MoE up's norm prologue (the same norm). Splits are added in order; when the logits are fewer than the threads,
// S threads share one (interleaved splits, their sums added in order).
// MK_RANK (default 1 since s17r2, part of v19): sigmoid routing without group limit picks each token's experts by
// rank, a thread per (token, expert), when that is at most 512 comparisons a thread; 0 (and other routers): one
// warp per token, top-k serial shuffle rounds (route_token).
#ifndef MK_RANK
#define MK_RANK 1
#endif
// MK_RTU (32 since s18r2, with MK_UNIQW; 16 before): unroll of the one-split partial-logit sums (T x E >=
// MK_THREADS: T = 16), i.e. how many of a thread's L2 loads are in flight at once; same sums in the same order.
#ifndef MK_RTU
#define MK_RTU 32
#endif
__device__ __noinline__ void route_tokens(const Params& p, const DInstr& I, int* raw, float* rw) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, E = I.E, T = p.T, TE = T * E;
  const bool fused = I.ws2 < 0;
  const int nks = fused ? (int)-I.ws2 : (int)I.ws2;
  float* lg = SM_XS;          // [T][E] logits, then scores
  float* ch = SM_XS + T * E;  // [T][E] choice scores
  const float* part = p.scratch + I.w2;
  const float* bias = I.bias >= 0 ? reinterpret_cast<const float*>(p.weights + I.bias) : nullptr;
  const int S = max(1, min(nks, MK_BT / TE));
  if (S == 1) {
    MK_COLD_LOOP for (int i = threadIdx.x; i < TE; i += MK_BT) {
      float a = 0.f;
MK_PRAGMA_UNROLL(MK_RTU)
      for (int k = 0; k < nks; k++) a += ldcg(part + (long long)k * TE + i);
      lg[i] = a;
    }
  } else {
    float* sub = SM_STAGE;  // [S][T * E]
    if (threadIdx.x < S * TE) {
      const int sp = threadIdx.x / TE, i = threadIdx.x - sp * TE;
      float a = 0.f;
#pragma unroll 8
      for (int k = sp; k < nks; k += S) a += ldcg(part + (long long)k * TE + i);
      sub[threadIdx.x] = a;
    }
    block_sync();
    MK_COLD_LOOP for (int i = threadIdx.x; i < TE; i += MK_BT) {
      float a = 0.f;
      for (int sp = 0; sp < S; sp++) a += sub[sp * TE + i];
      lg[i] = a;
    }
  }
  if (fused) {
    // Sums of squares: a warp per token, lanes over interleaved splits, added by a fixed shuffle tree.
    const float* ss = part + (long long)nks * TE;
    for (int t = warp; t < T; t += MK_BW) {
      float a = 0.f;
#pragma unroll 4
      for (int k = lane; k < nks; k += 32) a += ldcg(ss + (long long)k * T + t);
      a = warp_sum(a);
      if (lane == 0) SM_INV[t] = rsqrtf(a / I.qd + I.theta);
    }
    block_sync();
    MK_COLD_LOOP for (int i = threadIdx.x; i < TE; i += MK_BT) lg[i] *= SM_INV[i / E];
  }
  block_sync();
  if (MK_RANK && I.sigmoid && I.ngroup <= 1 && ((TE + MK_BT - 1) / MK_BT) * E <= 512) {
    // A thread per (token, expert): its sigmoid score and choice value, then its rank among the token's choices
    // (higher first, ties: lower index); ranks below topk are the picks in route_token's order.
    MK_COLD_LOOP for (int i = threadIdx.x; i < TE; i += MK_BT) {
      const float sc = 1.f / (1.f + __expf(-lg[i]));
      lg[i] = sc;
      ch[i] = sc + (bias ? __ldg(bias + (i - (i / E) * E)) : 0.f);
    }
    block_sync();
    MK_COLD_LOOP for (int i = threadIdx.x; i < TE; i += MK_BT) {
      const int t = i / E, e = i - t * E;
      const float v = ch[i];
      const float* row = ch + t * E;
      int r = 0;
      for (int f = 0; f < E; f++) {
        const float w = row[f];
        r += (w > v || (w == v && f < e)) ? 1 : 0;
      }
      if (r < I.topk) {
        raw[t * I.topk + r] = e;
        rw[t * I.topk + r] = lg[i];
      }
    }
    block_sync();
    MK_COLD_LOOP for (int t = threadIdx.x; t < T; t += MK_BT) {
      float* w = rw + t * I.topk;
      float wsum = 0.f;
      for (int k = 0; k < I.topk; k++) wsum += w[k];
      for (int k = 0; k < I.topk; k++) w[k] = (I.normtopk ? w[k] / (wsum + 1e-20f) : w[k]) * I.rscale;
    }
  } else {
    for (int t = warp; t < T; t += MK_BW)
      route_token(I, bias, lg + t * E, ch + t * E, SM_RED + warp * 32, raw + t * I.topk, rw + t * I.topk);
  }
  block_sync();
  if (blockIdx.x == 0 && I.aux >= 0) {
    MK_COLD_LOOP for (int i = threadIdx.x; i < T * I.topk; i += MK_BT) {
      const int t = i / I.topk, k = i - t * I.topk;
      float* row = p.arena + I.aux + (long long)t * (2 * I.topk);
      row[k] = (float)raw[i];
      row[I.topk + k] = rw[i];
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
  MK_COLD_LOOP for (int i = threadIdx.x; i < nw; i += MK_BT) bits[i] = 0u;
  route_tokens(p, I, raw, rw);
  MK_COLD_LOOP for (int i = threadIdx.x; i < n; i += MK_BT) {
    const int e = raw[i];
    if ((unsigned int)e < (unsigned int)E) atomicOr(&bits[e >> 5], 1u << (e & 31));
  }
  block_sync();
  if (threadIdx.x == 0) {
    int U = 0;
    for (int w = 0; w < nw; w++) { mst[w] = U; U += __popc(bits[w]); }
    SM_IV[IV_U] = U;
  }
  block_sync();
  MK_COLD_LOOP for (int w = threadIdx.x; w < nw; w += MK_BT) {
    unsigned int b = bits[w];
    int pos = mst[w];
    while (b) { int j = __ffs(b) - 1; ids[pos++] = w * 32 + j; b &= b - 1; }
  }
  block_sync();
  const int U = SM_IV[IV_U];
#if MK_UNIQW
  // A warp per routed expert: its members counted and listed 32 pairs a step by ballots (ascending pair index),
  // and the member starts scanned by warp 0 (the thread-per-expert loops walked all T x topk pairs serially: 128
  // dependent shared loads twice at T = 16).
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  MK_COLD_LOOP for (int u = warp; u < U; u += MK_BW) {
    const int e = ids[u];
    int c = 0;
    MK_COLD_LOOP for (int i0 = 0; i0 < n; i0 += 32)
      c += __popc(__ballot_sync(0xffffffffu, i0 + lane < n && raw[i0 + lane] == e));
    if (lane == 0) cnt[u] = c;
  }
  block_sync();
  if (warp == 0) {
    int carry = 0, mx = 0;
    MK_COLD_LOOP for (int u0 = 0; u0 < U; u0 += 32) {
      const int v = u0 + lane < U ? cnt[u0 + lane] : 0;
      int inc = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
      }
      if (u0 + lane < U) mst[u0 + lane] = carry + inc - v;
      mx = max(mx, v);
      carry += __shfl_sync(0xffffffffu, inc, 31);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) {
      mst[U] = carry;
      SM_IV[IV_U + 1] = mx;
    }
  }
  block_sync();
  MK_COLD_LOOP for (int u = warp; u < U; u += MK_BW) {
    const int e = ids[u];
    int pos = mst[u];
    MK_COLD_LOOP for (int i0 = 0; i0 < n; i0 += 32) {
      const bool hit = i0 + lane < n && raw[i0 + lane] == e;
      const unsigned int b = __ballot_sync(0xffffffffu, hit);
      if (hit) ml[pos + __popc(b & ((1u << lane) - 1u))] = i0 + lane;
      pos += __popc(b);
    }
  }
  block_sync();
  return U;
#else
  MK_COLD_LOOP for (int u = threadIdx.x; u < U; u += MK_BT) {
    int e = ids[u], c = 0;
    for (int i = 0; i < n; i++) c += raw[i] == e;
    cnt[u] = c;
  }
  block_sync();
  if (threadIdx.x == 0) {
    int a = 0, mx = 0;
    for (int u = 0; u < U; u++) { mst[u] = a; a += cnt[u]; mx = max(mx, cnt[u]); }
    mst[U] = a;
    SM_IV[IV_U + 1] = mx;
  }
  block_sync();
  MK_COLD_LOOP for (int u = threadIdx.x; u < U; u += MK_BT) {
    int e = ids[u], pos = mst[u];
    for (int i = 0; i < n; i++) if (raw[i] == e) ml[pos++] = i;
  }
  block_sync();
  return U;
#endif
}

// UP: the block's share of (routed expert, column tile) work. Blocks are split into contiguous groups, one group
// per routed expert, so a block loads its expert's member activations once and streams all of its column tiles
// (batched as far as the stage holds them) through one pass of the weight ring. scratch[(t * topk + k) * inter + c] = silu(gate) * up for every member pair (t, k).
// The SwiGLU column tiles q + j nb (j < nt) of routed expert u: gate and up rows, activations of its members
// (normalized with normw by the factors prep left in SM_INV) resident when they fit, else in K chunks.
__device__ __forceinline__ void moe_up_tiles(const Params& p, Smem& s, const DInstr& I, const float* normw, int u,
                                             int q, int nb, int nt) {
  const int* ids = SM_IV + IV_IDS;
  const int* cnt = SM_IV + IV_CNT;
  const int* mst = SM_IV + IV_MST;
  const int* ml = SM_IV + IV_ML;
  const int m = cnt[u];
  const int* mem = ml + mst[u];
  long long we, wse;
  expert_offsets(I.fmt, I.w, I.ws, ids[u], 2 * I.inter, I.k, &we, &wse);
  const int kcw = chunk_width(I.k, m);
  const bool full = kcw == I.k;
  const int tr = I.tile_rows;
  const int B = max(1, MK_STAGE / (m * 2 * tr));                // tiles per batch (stage capacity)
  block_sync();
  if (full && nt > 0) {
    load_rows(p.arena + I.x, I.xw, mem, I.topk, m, 0, I.k, I.k, SM_XS, SM_INV, normw, mma_fmt(I.fmt));
  }
  for (int jb = 0; jb < nt; jb += B) {
    const int nbt = min(B, nt - jb);
    const int sstride = nbt * 2 * tr;
    TileRows d{};
    d.mode = 3; d.c0 = (q + jb * nb) * tr; d.cols = tr; d.split = I.inter; d.jstride = nb * tr; d.w = we;
    d.ws = wse; d.K = I.k; d.n = m; d.xstride = kcw; d.sstride = sstride;
    MK_COLD_LOOP for (int i = threadIdx.x; i < m * sstride; i += MK_BT) SM_STAGE[i] = 0.f;
    if (full) {
      block_sync();
      rows_dot(I.fmt, p.weights, d, 0, I.k, SM_XS, sstride, SM_STAGE, m, s);
    } else {
      for (int k0 = 0; k0 < I.k; k0 += kcw) {
        int kc = min(kcw, I.k - k0);
        block_sync();
        load_rows(p.arena + I.x, I.xw, mem, I.topk, m, k0, kc, kcw, SM_XS, SM_INV, normw, mma_fmt(I.fmt));
        block_sync();
        rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, sstride, SM_STAGE, m, s);
      }
    }
    block_sync();
    MK_COLD_LOOP for (int i = threadIdx.x; i < m * nbt * tr; i += MK_BT) {
      const int jm = i / (nbt * tr), rem = i - jm * (nbt * tr);
      const int j = rem / tr, c = rem - j * tr;
      const int col = (q + (jb + j) * nb) * tr + c;
      if (col >= I.inter) continue;
      float g = SM_STAGE[jm * sstride + j * 2 * tr + c], uu = SM_STAGE[jm * sstride + j * 2 * tr + tr + c];
      p.scratch[(long long)mem[jm] * I.inter + col] = silu_f(g) * uu;
    }
    block_sync();
  }
}

__device__ __noinline__ void op_moe_up(const Params& p, Smem& s, const DInstr& I) {
  const int U = SM_IV[IV_U];
  const int ctiles = (I.inter + I.tile_rows - 1) / I.tile_rows;
  const int* cnt = SM_IV + IV_CNT;
  // Fused RMSNorm prologue: prep left each token's 1 / rms in SM_INV.
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
#if MK_MOEW == 2
  // Items (expert u, column tile j) in expert-major order, each costing moe_cost (the tile's weights stream
  // once whatever its members; members add activation loads and MMA columns). Block b takes the items whose cost
  // prefix starts in [b C / G, (b + 1) C / G): contiguous tiles of one or a few experts, balanced to within one
  // item whatever the member counts and however the experts divide among the blocks.
  cost_share(
      U, ctiles, [&](int u) { return moe_cost(I, cnt[u]); },
      [&](int u, int j0, int j1) { moe_up_tiles(p, s, I, normw, u, j0, 1, j1 - j0); });
#else
  const int G = gridDim.x, b = blockIdx.x;
  int u0, ustep, q, nb;
  if (U <= G && !MK_MOEW) {
    u0 = ((b + 1) * U - 1) / G;
    const int st = u0 * G / U;
    nb = (u0 + 1) * G / U - st;
    q = b - st;
    ustep = U;
  } else if (U <= G && MK_MOEST && U < MK_BT) {
    // As below, with expert u's first block st[u] = u + floor((G - U) C_u / C) (st[U] = G) computed once by
    // thread u in shared memory: each thread then only scans st (the serial loops below ran every expert's cost,
    // two integer divisions, on every thread, and were the MoE up's most instruction-cache-missed code).
    int* st = reinterpret_cast<int*>(SM_RED);  // [0, U]: costs, then first blocks
    const int me = threadIdx.x;
    if (me < U) st[me] = moe_cost(I, cnt[me]);
    block_sync();
    int cpre = 0, ctot = 0;
    if (me <= U) {
      MK_COLD_LOOP for (int u = 0; u < U; u++) {
        const int c = st[u];
        cpre += u < me ? c : 0;
        ctot += c;
      }
    }
    block_sync();
    if (me <= U) st[me] = me + (int)((long long)(G - U) * cpre / ctot);
    block_sync();
    u0 = 0;
    MK_COLD_LOOP while (b >= st[u0 + 1]) u0++;
    q = b - st[u0];
    nb = st[u0 + 1] - st[u0];
    ustep = U;
  } else if (U <= G) {
    // One block per routed expert, the other G - U shared in proportion to moe_cost: expert u gets blocks
    // [u + floor((G - U) C_u / C), u + 1 + floor((G - U) C_{u+1} / C)), C_u = its cost prefix sum.
    int ctot = 0;
    for (int u = 0; u < U; u++) ctot += moe_cost(I, cnt[u]);
    const long long R = G - U;
    int cu = 0, st = 0;
    u0 = U - 1;
    for (int u = 0; u < U; u++) {
      const int stn = u + 1 + (int)(R * (cu + moe_cost(I, cnt[u])) / ctot);
      if (b < stn) { u0 = u; break; }
      cu += moe_cost(I, cnt[u]);
      st = stn;
    }
    nb = u0 + 1 + (int)(R * (cu + moe_cost(I, cnt[u0])) / ctot) - st;
    q = b - st;
    ustep = U;
  } else {
    u0 = b; ustep = G; q = 0; nb = 1;
  }
  for (int u = u0; u < U; u += ustep)
    moe_up_tiles(p, s, I, normw, u, q, nb, q < ctiles ? (ctiles - q + nb - 1) / nb : 0);
#endif
}

// DOWN: tile = output column tile over H; its rows span the routed experts, so one pipelined pass streams the
// tile's expert rows. When all (token, slot) activation rows do not fit in shared memory, the experts go in groups
// whose member rows fit (packed), and only a single expert with too many members falls back to chunking K.
// out[t, c] = sum_k w[t,k] * down_{e(t,k)}[c] . scratch[t,k] (k ascending).
__device__ __noinline__ void op_moe_down(const Params& p, Smem& s, const DInstr& I, int tile) {
  const int U = SM_IV[IV_U], P = p.T * I.topk, H = I.n;
  const int c0 = tile * I.tile_rows, cols = min(I.tile_rows, H - c0);
  const int colsp = moe_colsp(cols);
  const int sstride = I.tile_rows;
  const int* ids = SM_IV + IV_IDS;
  const int* cnt = SM_IV + IV_CNT;
  const int* mst = SM_IV + IV_MST;
  const int* ml = SM_IV + IV_ML;
  const int maxm = SM_IV[IV_U + 1];
  MK_COLD_LOOP for (int i = threadIdx.x; i < P * sstride; i += MK_BT) SM_STAGE[i] = 0.f;
  TileRows d{};
  d.mode = 2; d.c0 = c0; d.cols = cols; d.w = I.w; d.ws = I.ws; d.erows = H; d.K = I.inter; d.sstride = sstride;
  d.ml = ml;
  if (mk_flags[0]) {
    // Every pair row is resident (prep), indexed by pair id.
    d.ids = ids; d.cnt = cnt; d.mst = mst; d.xpack = -1; d.xstride = I.inter;
    block_sync();
    rows_dot(I.fmt, p.weights, d, 0, I.inter, SM_XS, U * colsp, SM_STAGE, maxm, s);
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
        block_sync();
        load_rows(p.scratch, I.inter, ml + mst[ua], 1, m, k0, kc, kcw, SM_XS, nullptr, nullptr, mma_fmt(I.fmt));
        block_sync();
        rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, (ub - ua) * colsp, SM_STAGE, gm, s);
      }
      ua = ub;
    }
  }
  block_sync();
  const float* rw = reinterpret_cast<const float*>(SM_IV + IV_RW);
  MK_COLD_LOOP for (int i = threadIdx.x; i < p.T * cols; i += MK_BT) {
    int t = i / cols, c = i - t * cols;
    float a = 0.f;
    for (int k = 0; k < I.topk; k++) a += rw[t * I.topk + k] * SM_STAGE[(t * I.topk + k) * sstride + c];
    // Fused residual: out = residual + experts (the unfused add's operand order).
    if (I.res >= 0) a = ldcg(p.arena + I.res + (long long)t * I.resw + c0 + c) + a;
    p.arena[I.out + (long long)t * I.outw + c0 + c] = a;
  }
}

// DOWN, expert-major: when the routed pairs' activations do not all fit in shared memory (verify blocks; the
// encoder's test knob forces it). Each routed expert's down rows run against its members only; the unweighted
// outputs y[pair][c] go to scratch[I.kv_k ...]; a per-column-tile arrival counter (scratch[I.kv_v + tile], reset by
// the last arrival) lets the last of a tile's U experts combine it: out[t, c] = residual + sum_k w[t, k] *
// y[(t, k)][c], k ascending (the order of the per-tile path).
__device__ __forceinline__ bool moe_down_em(const Params& p, const DInstr& I) {
  return I.kv_k >= 0 && (I.heads == 1 || (long long)p.T * I.topk * I.inter > MK_XS);
}

// The expert-major combine of the column
// tiles this block arrived last on (last[q], q < nbt, tiles jb + q): their indices compacted first (ballot and
// per-warp counts), then four columns of one token per thread and round, every slot's per-pair outputs loaded as
// 16-byte vectors before the sums (the per-column loop walked every tile of the batch and waited a round trip per
// column: s13r1's T = 16 timeline shows the blocks that combine taking 35-65 us more than the rest). Same sums in the
// same order (k ascending, then the residual). s15r1, H100: T = 16 34.55 vs 36.88 ms (MoE-down path 8.81 -> 6.52
// ms).
// H % 4 == 0 (the encoder requires it).
__device__ __noinline__ void moe_down_combine(const Params& p, const DInstr& I, int jb, int nbt, const int* last) {
  const int H = I.n, WT = I.window, T = p.T, topk = I.topk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* y = p.scratch + I.kv_k;
  const float* rw = reinterpret_cast<const float*>(SM_IV + IV_RW);
  int* list = reinterpret_cast<int*>(SM_STAGE);  // the stage is free: the outputs went to y before the arrivals
  int* wcnt = list + MK_THREADS;
  const bool mine = (int)threadIdx.x < nbt && last[threadIdx.x];
  const unsigned int bal = __ballot_sync(0xffffffffu, mine);
  if (lane == 0) wcnt[warp] = __popc(bal);
  block_sync();
  int base = 0, total = 0;
#pragma unroll
  for (int w = 0; w < MK_BW; w++) {
    base += w < warp ? wcnt[w] : 0;
    total += wcnt[w];
  }
  if (mine) list[base + __popc(bal & ((1u << lane) - 1u))] = (int)threadIdx.x;
  block_sync();
  const int qw = WT >> 2, per = T * qw;  // column quads of a tile row, quads of a tile
#pragma unroll 2
  for (int i = threadIdx.x; i < total * per; i += MK_BT) {
    const int ci = i / per, r = i - ci * per, t = r / qw;
    const int c = (jb + list[ci]) * WT + 4 * (r - t * qw);
    if (c >= H) continue;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int k = 0; k < topk; k++) {
      const float w = rw[t * topk + k];
      const float4 v = __ldcg(reinterpret_cast<const float4*>(y + (long long)(t * topk + k) * H + c));
      a.x += w * v.x;
      a.y += w * v.y;
      a.z += w * v.z;
      a.w += w * v.w;
    }
    float* o = p.arena + I.out + (long long)t * I.outw + c;
    if (I.res >= 0) {
      const float* rr = p.arena + I.res + (long long)t * I.resw + c;
      a.x = ldcg(rr) + a.x;
      a.y = ldcg(rr + 1) + a.y;
      a.z = ldcg(rr + 2) + a.z;
      a.w = ldcg(rr + 3) + a.w;
    }
    o[0] = a.x;
    o[1] = a.y;
    o[2] = a.z;
    o[3] = a.w;
  }
}

// Expert-major MoE down (verify blocks, whose routed pairs' activations do not fit in shared memory): work items
// are (routed expert u, column tile of WT = I.window columns) in expert-major order, each costing pass_cost(I.vd, ..),
// and block b takes the items whose cost prefix starts in [b C / G, (b + 1) C / G) (balanced to within one item
// whatever the member counts: heavy experts no longer pile up on a few blocks). A block's items of one expert are
// contiguous columns: it loads that expert's member activations once (when they fit at full width) and streams
// the columns in batches the stage holds, one ring pass each. Per-pair outputs go to scratch; each column tile
// counts its U expert arrivals and the last one combines the tile (routing weights in slot order, then the
// residual), so the sum order is fixed.
__device__ __forceinline__ void moe_down_em_range(const Params& p, Smem& s, const DInstr& I, int u, int j0, int j1) {
  const int U = SM_IV[IV_U], H = I.n, WT = I.window;
  const int* ids = SM_IV + IV_IDS;
  const int* cnt = SM_IV + IV_CNT;
  const int* mst = SM_IV + IV_MST;
  const int* ml = SM_IV + IV_ML;
  float* y = p.scratch + I.kv_k;
  unsigned int* ctr = reinterpret_cast<unsigned int*>(p.scratch + I.kv_v);
  int* last = reinterpret_cast<int*>(SM_RED);  // per tile of a batch: this block combines it
  const int m = cnt[u];
  const int* mem = ml + mst[u];
  long long we, wse;
  expert_offsets(I.fmt, I.w, I.ws, ids[u], H, I.inter, &we, &wse);
  const int kcw = chunk_width(I.inter, m);
  const bool full = kcw == I.inter;
  const int B = max(1, min(MK_BT, MK_STAGE / (m * WT)));  // tiles per batch
  block_sync();
  if (full) load_rows(p.scratch, I.inter, mem, 1, m, 0, I.inter, I.inter, SM_XS, nullptr, nullptr, mma_fmt(I.fmt));
  for (int jb = j0; jb < j1; jb += B) {
    const int nbt = min(B, j1 - jb), c0 = jb * WT, cols = min(nbt * WT, H - c0), sstride = nbt * WT;
    TileRows d{};
    d.mode = 1; d.c0 = c0; d.cols = cols; d.split = 0; d.w = we; d.ws = wse; d.K = I.inter; d.n = m;
    d.xstride = kcw; d.sstride = sstride;
    for (int i = threadIdx.x; i < m * sstride; i += MK_BT) SM_STAGE[i] = 0.f;
    if (full) {
      block_sync();
      rows_dot(I.fmt, p.weights, d, 0, I.inter, SM_XS, cols, SM_STAGE, m, s);
    } else {
      for (int k0 = 0; k0 < I.inter; k0 += kcw) {
        const int kc = min(kcw, I.inter - k0);
        block_sync();
        load_rows(p.scratch, I.inter, mem, 1, m, k0, kc, kcw, SM_XS, nullptr, nullptr, mma_fmt(I.fmt));
        block_sync();
        rows_dot(I.fmt, p.weights, d, k0, kc, SM_XS, cols, SM_STAGE, m, s);
      }
    }
    block_sync();
    for (int i = threadIdx.x; i < m * cols; i += MK_BT) {
      const int j = i / cols, c = i - j * cols;
      y[(long long)mem[j] * H + c0 + c] = SM_STAGE[j * sstride + c];
    }
    // Arrivals, one thread per tile: the barrier orders the block's outputs before each arriving thread's fence.
    block_sync();
    arrivals(ctr + jb, nbt, U, last);
    moe_down_combine(p, I, jb, nbt, last);
    block_sync();
  }
}

__device__ __noinline__ void op_moe_down_em(const Params& p, Smem& s, const DInstr& I) {
  const int* cnt = SM_IV + IV_CNT;
  cost_share(
      SM_IV[IV_U], (I.n + I.window - 1) / I.window, [&](int u) { return pass_cost(I.vd, I.inter, cnt[u]); },
      [&](int u, int j0, int j1) { moe_down_em_range(p, s, I, u, j0, j1); });
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
#pragma unroll 4
      for (int i = threadIdx.x; i < I.k; i += MK_BT) {
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
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) { float v = ldcg(x + i); a += v * v; }
      a = warp_sum(a);
      if (lane == 0) SM_RED[warp] = a;
      block_sync();
      float tot = 0.f;
      for (int w = 0; w < MK_BW; w++) tot += SM_RED[w];
      float inv = rsqrtf(tot / I.k + I.eps);
      const float* g = reinterpret_cast<const float*>(p.weights + I.normw);
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) out[i] = ldcg(x + i) * inv * __ldg(g + i);
      break;
    }
    case OP_ROPE: {
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) SM_XS[i] = ldcg(x + i);
      block_sync();
      apply_rope_stage(SM_XS, 0, 1, I.k, 0, I.hd, I.rotary, I.theta, p.pos + t);
      block_sync();
      for (int i = threadIdx.x; i < I.k; i += MK_BT) out[i] = SM_XS[i];
      break;
    }
    case OP_KVWRITE: {
      float* base = p.kv + (I.kvkind == 0 ? I.kv_k : I.kv_v);
      int slot = p.pos[t] % I.kv_cap;
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) base[(long long)slot * I.k + i] = ldcg(x + i);
      break;
    }
    case OP_SWIGLU: {
      int h = I.k / 2;
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < h; i += MK_BT) out[i] = silu_f(ldcg(x + i)) * ldcg(x + h + i);
      break;
    }
    case OP_SCALE:
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) out[i] = ldcg(x + i) * I.scale;
      break;
    case OP_ADD: {
      const float* y = p.arena + I.res + (long long)t * I.resw;
      // Unrolled so that a thread's loads are in flight together (one memory latency, not one per element).
#pragma unroll 8
      for (int i = threadIdx.x; i < I.k; i += MK_BT) out[i] = ldcg(x + i) + ldcg(y + i);
      break;
    }
    case OP_ARGMAX: {
      // Greedy argmax, or Gumbel-max sampling at temperature > 0: the LM head tiles' candidates (aux >= 0) or the
      // logits row itself. Ties go to the lowest index.
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      if (I.aux >= 0) {
        const float2* c = reinterpret_cast<const float2*>(p.scratch + I.aux) + (long long)t * I.n;
        for (int i = threadIdx.x; i < I.n; i += MK_BT) {
          const float2 v = __ldcg(c + i);
          best_of(bv, bi, v.x, __float_as_int(v.y));
        }
      } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < I.k; i += MK_BT) best_of(bv, bi, sample_key(p, t, i, ldcg(x + i)), i);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
        best_of(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
      if (lane == 0) { SM_RED[warp] = bv; SM_IV[MK_ARGI + warp] = bi; }
      block_sync();
      if (threadIdx.x == 0) {
        for (int w = 0; w < MK_BW; w++) best_of(bv, bi, SM_RED[w], SM_IV[MK_ARGI + w]);
        p.out_tokens[t] = bi;
      }
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// What the shared activation buffer holds after a resident matmul / router preparation (x, xw, k, normw low and
// high words, fragment order), so that the next instruction reading the same rows the same way (q, k and v of an
// attention layer) skips the load, the norm and the rewrite. x = -1: nothing reusable.
__shared__ int mk_xkey[6];

// MoE: hand the routing lists in SM_IV (complete: moe_unique ends with a barrier, or a previous instruction built
// them) to the decoupled producer (MK_DEC; nothing otherwise).
__device__ __forceinline__ void publish_lists(Smem& s) {
#if MK_DEC
  if (threadIdx.x == 0) mbar_arrive(&mk_ivready);
  s.npub++;
#endif
}

// Per-instruction preparation, run by every block that works on the instruction: activations that all of the
// block's tiles share are loaded into shared memory once (normalized in place for a fused RMSNorm) unless the
// buffer already holds them (mk_xkey), and the MoE routing lists are built.
__device__ __noinline__ void prep(const Params& p, Smem& s, const DInstr& I) {
  const float* normw = I.normw >= 0 ? reinterpret_cast<const float*>(p.weights + I.normw) : nullptr;
  const bool res = (I.op == OP_MATMUL || I.op == OP_ROUTER) && (long long)p.T * I.k <= MK_XS;
  const int key[6] = {I.x, I.xw, I.k, (int)(I.normw & 0xffffffff), (int)(I.normw >> 32), mma_fmt(I.fmt) ? 1 : 0};
  bool hit = res;
#pragma unroll
  for (int i = 0; i < 6; i++) hit = hit && mk_xkey[i] == key[i];
#if MK_DEC
  // MoE: the decoupled producer has copied the previous routing lists before moe_unique overwrites SM_IV.
  const bool moe = I.op == OP_MOE_UP || I.op == OP_MOE_DOWN;
  if (moe && threadIdx.x == 0 && s.npub > 0) mbar_wait(&mk_ivfree, (unsigned int)(s.npub - 1) & 1u);
#endif
  block_sync();  // every thread has read the key
  if (threadIdx.x == 0) {
    mk_flags[0] = 0;
#pragma unroll
    for (int i = 0; i < 6; i++) mk_xkey[i] = res ? key[i] : -1;  // anything else may overwrite the buffer
  }
  if (hit) {
    if (threadIdx.x == 0) mk_flags[0] = 1;
  } else if (I.op == OP_MATMUL || I.op == OP_ROUTER) {
    if (res) {
      if (!load_resident(p.arena + I.x, I.xw, p.T, I.k, I.eps, normw, mma_fmt(I.fmt))) {
        load_rows(p.arena + I.x, I.xw, nullptr, 1, p.T, 0, I.k, I.k, SM_XS, nullptr, nullptr, false);
        if (normw) {
          block_sync();
          rms_resident(s, p.T, I.k, I.k, I.eps, normw);
        }
        if (mma_fmt(I.fmt)) {
          block_sync();
          xs_frag(SM_XS, p.T, I.k, I.k);
        }
      }
      if (threadIdx.x == 0) mk_flags[0] = 1;
    } else if (normw) {
      rms_factors(p, s, I.x, I.xw, I.k, I.eps);
    }
  } else if (I.op == OP_MOE_UP) {
    moe_unique(p, s, I);
    publish_lists(s);
    if (normw && I.ws2 >= 0) rms_factors(p, s, I.x, I.xw, I.k, I.eps);  // fused router: route_tokens set SM_INV
  } else if (I.op == OP_MOE_DOWN) {
    // The routing lists of the MoE up this block ran just before (same routing buffer) are still in SM_IV.
    if (mk_flags[1] != (int)I.aux) moe_unique(p, s, I);
    publish_lists(s);
    const int P = p.T * I.topk;
    if ((long long)P * I.inter <= MK_XS && !moe_down_em(p, I)) {
      load_rows(p.scratch, I.inter, nullptr, 1, P, 0, I.inter, I.inter, SM_XS, nullptr, nullptr, mma_fmt(I.fmt));
      if (threadIdx.x == 0) mk_flags[0] = 1;
    }
  }
  block_sync();
}



#if MK_DEC
// ---------------------------------------------------------------------------------------------------------------
// The decoupled producer (MK_DEC): warp MK_CW walks the instruction stream by itself and issues, in order, every
// ring call this block's consumers will make, deriving them the way the consumers do (the same geometry, residency
// and schedule functions; mk_callid lets the consumers check each call). Weights do not depend on activations, so
// it never waits for a dependency: only for free ring slots and, at a MoE instruction, for the routing lists.
struct PState {
  unsigned int it;  // ring chunks issued so far (the consumers' s.ring_it, ahead)
  int ncall;        // ring calls with chunks issued so far
  int npub;         // routing lists received so far
};

// One ring call: its identity record, then all of its chunks (ring_produce waits for each slot).
__device__ __noinline__ void producer_call(const Params& p, int fmt, TileRows d, int k0, int kc, int nrows,
                                           PState& ps) {
  const int lane = threadIdx.x & 31;
  d.rdiv.init(d.mode == 3 ? 2 * d.cols : d.mode == 2 ? moe_colsp(d.cols) : 1);
  unsigned int n = 0;
  switch (fmt) {
    case FMT_BF16: n = ring_chunks<FMT_BF16>(kc, nrows); break;
    case FMT_F8: n = ring_chunks<FMT_F8>(kc, nrows); break;
    case FMT_MXFP4: n = ring_chunks<FMT_MXFP4>(kc, nrows); break;
    default: return;  // scalar formats do not use the ring
  }
  if (n == 0) return;
  if (lane == 0) {  // published by the call's first chunk (lane 0's arrive on its full barrier is a release)
    int* r = mk_callid[ps.ncall & 7];
    r[0] = d.c0; r[1] = nrows; r[2] = k0; r[3] = kc; r[4] = (int)d.w; r[5] = d.mode;
  }
  __syncwarp();
  switch (fmt) {
    case FMT_BF16: ring_produce<FMT_BF16>(p.weights, d, k0, kc, nrows, ps.it, 0, 1 << 30); break;
    case FMT_F8: ring_produce<FMT_F8>(p.weights, d, k0, kc, nrows, ps.it, 0, 1 << 30); break;
    default: ring_produce<FMT_MXFP4>(p.weights, d, k0, kc, nrows, ps.it, 0, 1 << 30); break;
  }
  __syncwarp();
  ps.it += n;
  ps.ncall++;
}

// A call over K columns [0, K) in chunks of kcw (one call when kcw >= K), as the consumers' K loops make them.
__device__ __forceinline__ void producer_kloop(const Params& p, int fmt, const TileRows& d, int K, int kcw, int nrows,
                                               PState& ps) {
  for (int k0 = 0; k0 < K; k0 += kcw) producer_call(p, fmt, d, k0, min(kcw, K - k0), nrows, ps);
}

// op_matmul / op_matmul_kouter's calls.
__device__ __noinline__ void producer_matmul(const Params& p, const DInstr& I, int first, int ntiles, PState& ps) {
  const int G = gridDim.x, T = p.T;
  const int res = (long long)T * I.k <= MK_XS ? 1 : 0;  // prep's mk_flags[0]
  const int kcw = chunk_width(I.k, T);
  const bool ko = matmul_kouter(p, I, first, ntiles, res);
  if (ko) {
    const int per = T * 2 * I.tile_rows, B = MK_STAGE / per;
    for (int t0 = first; t0 < ntiles; t0 += B * G) {
      const int nb = min(B, (ntiles - t0 + G - 1) / G);
      for (int k0 = 0; k0 < I.k; k0 += kcw)
        for (int j = 0; j < nb; j++) {
          TileRows d;
          int nrows, kc1;
          matmul_geom(p, I, t0 + j * G, d, nrows, kc1);
          producer_call(p, I.fmt, d, k0, min(kcw, I.k - k0), nrows, ps);
        }
    }
  }
  for (int tile = ko ? ntiles : first; tile < ntiles; tile += G) {
    TileRows d;
    int nrows, kc1;
    matmul_geom(p, I, tile, d, nrows, kc1);
    producer_kloop(p, I.fmt, d, I.k, res ? I.k : kcw, nrows, ps);
  }
}

// moe_up_tiles' calls: expert u's column tiles q + j nb, j < nt.
__device__ __noinline__ void producer_moe_up(const Params& p, const DInstr& I, int u, int q, int nb, int nt,
                                             PState& ps) {
  const int m = mk_piv[PV_CNT + u];
  long long we, wse;
  expert_offsets(I.fmt, I.w, I.ws, mk_piv[PV_IDS + u], 2 * I.inter, I.k, &we, &wse);
  const int kcw = chunk_width(I.k, m), tr = I.tile_rows;
  const int B = max(1, MK_STAGE / (m * 2 * tr));
  for (int jb = 0; jb < nt; jb += B) {
    const int nbt = min(B, nt - jb), sstride = nbt * 2 * tr;
    TileRows d{};
    d.mode = 3; d.c0 = (q + jb * nb) * tr; d.cols = tr; d.split = I.inter; d.jstride = nb * tr; d.w = we;
    d.ws = wse; d.K = I.k; d.n = m; d.xstride = kcw; d.sstride = sstride;
    producer_kloop(p, I.fmt, d, I.k, kcw, sstride, ps);
  }
}

// moe_down_em_range's calls: expert u's column tiles j0 .. j1 - 1.
__device__ __noinline__ void producer_moe_down_em(const Params& p, const DInstr& I, int u, int j0, int j1,
                                                  PState& ps) {
  const int H = I.n, WT = I.window, m = mk_piv[PV_CNT + u];
  long long we, wse;
  expert_offsets(I.fmt, I.w, I.ws, mk_piv[PV_IDS + u], H, I.inter, &we, &wse);
  const int kcw = chunk_width(I.inter, m);
  const int B = max(1, min(MK_BT, MK_STAGE / (m * WT)));
  for (int jb = j0; jb < j1; jb += B) {
    const int nbt = min(B, j1 - jb), c0 = jb * WT, cols = min(nbt * WT, H - c0);
    TileRows d{};
    d.mode = 1; d.c0 = c0; d.cols = cols; d.split = 0; d.w = we; d.ws = wse; d.K = I.inter; d.n = m;
    d.xstride = kcw; d.sstride = nbt * WT;
    producer_kloop(p, I.fmt, d, I.inter, kcw, cols, ps);
  }
}

// A MoE instruction's calls, from the routing lists the consumers hand over after prep.
__device__ __noinline__ void producer_moe(const Params& p, const DInstr& I, int first, int ntiles, bool em,
                                          PState& ps) {
  const int lane = threadIdx.x & 31, G = gridDim.x, b = blockIdx.x;
  mbar_wait(&mk_ivready, (unsigned int)ps.npub & 1u);
  const int U = SM_IV[IV_U];
  for (int i = lane; i < U; i += 32) {
    mk_piv[PV_IDS + i] = SM_IV[IV_IDS + i];
    mk_piv[PV_CNT + i] = SM_IV[IV_CNT + i];
  }
  for (int i = lane; i <= U; i += 32) mk_piv[PV_MST + i] = SM_IV[IV_MST + i];
  if (lane == 0) mk_piv[0] = U;
  __syncwarp();
  mbar_arrive(&mk_ivfree);  // every lane: its reads of SM_IV are done
  ps.npub++;
  const int* cnt = mk_piv + PV_CNT;
  if (I.op == OP_MOE_UP) {
    // op_moe_up's assignment (MK_MOEW = 1): expert u's first block u + floor((G - U) C_u / C).
    const int ctiles = (I.inter + I.tile_rows - 1) / I.tile_rows;
    int u0 = b, ustep = G, q = 0, nb = 1;
    if (U <= G) {
      int ctot = 0;
      for (int u = 0; u < U; u++) ctot += moe_cost(I, cnt[u]);
      int cpre = 0;
      for (int u = 0; u < U; u++) {
        const int c = moe_cost(I, cnt[u]);
        const int st = u + (int)((long long)(G - U) * cpre / ctot);
        const int stn = u + 1 + (int)((long long)(G - U) * (cpre + c) / ctot);
        if (b < stn) {
          u0 = u; q = b - st; nb = stn - st;
          break;
        }
        cpre += c;
      }
      ustep = U;
    }
    for (int u = u0; u < U; u += ustep)
      producer_moe_up(p, I, u, q, nb, q < ctiles ? (ctiles - q + nb - 1) / nb : 0, ps);
  } else if (em) {
    cost_share(
        U, (I.n + I.window - 1) / I.window, [&](int u) { return pass_cost(I.vd, I.inter, cnt[u]); },
        [&](int u, int j0, int j1) { producer_moe_down_em(p, I, u, j0, j1, ps); });
  } else {
    // op_moe_down's calls per column tile.
    const int H = I.n, P = p.T * I.topk;
    const bool res = (long long)P * I.inter <= MK_XS;  // prep's mk_flags[0] (not expert-major)
    const int* mst = mk_piv + PV_MST;
    for (int tile = first; tile < ntiles; tile += G) {
      const int c0 = tile * I.tile_rows, cols = min(I.tile_rows, H - c0), colsp = moe_colsp(cols);
      TileRows d{};
      d.mode = 2; d.c0 = c0; d.cols = cols; d.w = I.w; d.ws = I.ws; d.erows = H; d.K = I.inter;
      d.sstride = I.tile_rows;
      if (res) {
        d.ids = mk_piv + PV_IDS; d.cnt = cnt; d.mst = mst; d.xpack = -1; d.xstride = I.inter;
        producer_call(p, I.fmt, d, 0, I.inter, U * colsp, ps);
      } else {
        const int cap = MK_XS / I.inter;
        for (int ua = 0; ua < U;) {
          int ub = ua + 1;
          while (ub < U && mst[ub + 1] - mst[ua] <= cap) ub++;
          const int kcw = chunk_width(I.inter, mst[ub] - mst[ua]);
          d.ids = mk_piv + PV_IDS + ua; d.cnt = cnt + ua; d.mst = mst + ua; d.xpack = mst[ua]; d.xstride = kcw;
          producer_kloop(p, I.fmt, d, I.inter, kcw, (ub - ua) * colsp, ps);
          ua = ub;
        }
      }
    }
  }
}

// The producer warp's whole forward: each instruction's descriptor and pre-tiled weights from global memory into
// its own shared copies, then the block's ring calls of it, in the consumers' order.
__device__ __noinline__ void producer_main(const Params& p) {
  const int lane = threadIdx.x & 31;
  const unsigned int G = gridDim.x;
  PState ps;
  ps.it = 0; ps.ncall = 0; ps.npub = 0;
  for (int i = 0; i < p.ninstr; i++) {
    const int* src = reinterpret_cast<const int*>(p.instrs + i);
    int* dst = reinterpret_cast<int*>(&mk_pcur);
    dst[lane] = __ldg(src + lane);
    dst[lane + 32] = __ldg(src + lane + 32);
    if (lane == 0) {
      const long long t0 = p.tinfo != nullptr ? __ldg(p.tinfo + 3ll * i) : -1;
      const long long t1 = p.tinfo != nullptr ? __ldg(p.tinfo + 3ll * i + 1) : -1;
      mk_tw = t0 >= 0 ? p.tiled + t0 : nullptr;
      mk_tsc = t1 >= 0 ? p.tiled + t1 : nullptr;
      mk_tnb = p.tinfo != nullptr ? __ldg(p.tinfo + 3ll * i + 2) : 0;
    }
    __syncwarp();
    const DInstr& I = mk_pcur;
    if (I.op == OP_MATMUL || I.op == OP_ROUTER || I.op == OP_MOE_UP || I.op == OP_MOE_DOWN) {
      // The main loop's work test (attention's tile count is not needed: it makes no ring calls).
      const int ntiles = I.ntiles < 0 ? -I.ntiles * p.T : I.ntiles;
      int first = ((int)blockIdx.x - I.rot) % (int)G;
      if (first < 0) first += G;
      const bool em = I.op == OP_MOE_DOWN && moe_down_em(p, I);
      if (I.op == OP_MOE_UP || I.op == OP_MOE_DOWN) {
        if (first < ntiles || I.op == OP_MOE_UP || em) producer_moe(p, I, first, ntiles, em, ps);
      } else if (I.op == OP_MATMUL) {
        producer_matmul(p, I, first, ntiles, ps);
      } else {
        for (int tile = first; tile < ntiles; tile += G) {
          TileRows d;
          int k0, kc, rows;
          router_geom(p, I, tile, d, k0, kc, rows);
          producer_call(p, I.fmt, d, k0, kc, rows, ps);
        }
      }
    }
    __syncwarp();  // every lane is done with mk_pcur and the tiled pointers
  }
}
#endif

#if MK_V23
// Present only in builds that stream MXFP4 through the v23 ring: the runtime tiles MXFP4 weights step-major
// (mimo_tile with a negative pitch) for those.
extern "C" __global__ void mimo_v23_marker() {}
#endif

#if MK_TMAP
// Present only in builds that read Params::tmaps / tmok: the runtime encodes tensor maps only for those.
extern "C" __global__ void mimo_tmap_marker() {}
#endif

// MK_GRIDCONST=1 (the default since s12r1): the parameters stay in the kernel's parameter space
// (`__grid_constant__`), read through the constant cache, instead of a copy in local memory that every callee
// reads with LDL (the dependency wait's acquire fence invalidates L1). H100, same call: T = 1 11.42 vs 11.61 ms,
// T = 4 17.70 vs 18.02; MK_GRIDCONST=0 builds the old form.
#ifndef MK_GRIDCONST
#define MK_GRIDCONST 1
#endif
#if MK_GRIDCONST
#define MK_PARAMS const __grid_constant__ Params
#else
#define MK_PARAMS Params
#endif
extern "C" __global__ void __launch_bounds__(MK_THREADS, 1) mimo_forward(MK_PARAMS p) {
  Smem s;
  s.ring_it = 0;
  s.pre = 0; s.pre_c0 = 0; s.pre_rows = 0; s.pre_kc = 0; s.pre_k0 = 0; s.pre_w = 0;
#if MK_DEC
  s.ncall = 0; s.npub = 0;
#endif
  if (threadIdx.x == 0) {
    for (int i = 0; i < RING_NS; i++) {
      mbar_init(mk_bars + i, MK_LDGSTS ? 32 : 1);
      mbar_init(mk_bars + RING_NS + i, MK_CW * (MK_ARRIVE_ALL ? 32 : 1));
    }
    mbar_init(&mk_cbar, MK_CW * 32);
#if MK_DEC
    mbar_init(&mk_ivready, 1);
    mbar_init(&mk_ivfree, 32);
#endif
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    mk_prof_on = p.prof != nullptr;
  }
  if (threadIdx.x < 5) mk_stat[threadIdx.x] = 0;
  if (threadIdx.x == 0) mk_tmark = 0ull;
  if (threadIdx.x == 0) mk_flags[1] = -1;
  if (threadIdx.x < 6) mk_xkey[threadIdx.x] = -1;
  DInstr& cur = mk_cur;
  const unsigned int G = gridDim.x;
  const unsigned int target = p.epoch * G;
  // Descriptor words of the next instruction, loaded one instruction ahead (the load's latency hides behind the
  // current instruction's work).
  int nxt = threadIdx.x < 64 && p.ninstr > 0 ? reinterpret_cast<const int*>(p.instrs)[threadIdx.x] : 0;
  // The next instruction's pre-tiled weights (v18: tiled weights and scales offsets, 16-row blocks; thread 65),
  // also loaded one ahead.
  long long tin0 = -1, tin1 = -1, tin2 = 0;
  if (threadIdx.x == 65 && p.tinfo != nullptr && p.ninstr > 0) {
    tin0 = p.tinfo[0]; tin1 = p.tinfo[1]; tin2 = p.tinfo[2];
  }
#if MK_TMAP
  // The tensor-map flags of the next instruction, also loaded one ahead (thread 64); the maps need 1 KB-aligned
  // ring slots.
  const bool tm_on = p.tmok != nullptr && (smem_u32(mk_smem) & 1023u) == 0;
  unsigned int tmn = threadIdx.x == 64 && tm_on && p.ninstr > 0 ? p.tmok[0] : 0u;
#endif
#if MK_DEC
  __syncthreads();  // the barriers are initialized
  if ((threadIdx.x >> 5) == MK_CW) {
    producer_main(p);
  } else
#endif
  for (int i = 0; i < p.ninstr; i++) {
    unsigned long long t0 = 0, t1 = 0;
    if (p.prof && threadIdx.x == 0) t0 = gtimer();
    // Control: publish the descriptor, fetch the next one, wait for producers.
    if (threadIdx.x < 64) reinterpret_cast<int*>(&cur)[threadIdx.x] = nxt;
    if (!MK_DEC && threadIdx.x == 65) {  // (MK_DEC: the producer keeps its own)
      mk_tw = tin0 >= 0 ? p.tiled + tin0 : nullptr;
      mk_tsc = tin1 >= 0 ? p.tiled + tin1 : nullptr;
      mk_tnb = tin2;
    }
#if MK_TMAP
    if (threadIdx.x == 64) {
      const uint8_t* m = p.tmaps + (long long)i * 384;
      mk_tmw = (tmn & (MK_TMAP == 2 ? 2u : 1u)) ? m : nullptr;
      mk_tms = (tmn & 4u) ? m + 256 : nullptr;
      mk_tmfence = 0;
    }
#endif
    block_sync();
    if (threadIdx.x < 64 && i + 1 < p.ninstr) nxt = reinterpret_cast<const int*>(p.instrs + i + 1)[threadIdx.x];
    if (threadIdx.x == 65 && p.tinfo != nullptr && i + 1 < p.ninstr) {
      const long long* ti = p.tinfo + 3ll * (i + 1);
      tin0 = ti[0]; tin1 = ti[1]; tin2 = ti[2];
    }
#if MK_TMAP
    if (threadIdx.x == 64 && tm_on && i + 1 < p.ninstr) tmn = p.tmok[i + 1];
#endif
    // Negative tile counts scale with the tokens of this forward: -n means n * T tiles. Attention: a tile per
    // (token, kv head, group of up to MK_WARPS heads), each split over attn_splits blocks when there are few.
    const int ntiles = cur.op == OP_ATTN ? p.T * cur.nkv * attn_groups(cur) * attn_splits(p.T, cur)
                                         : (cur.ntiles < 0 ? -cur.ntiles * p.T : cur.ntiles);
    int first = ((int)blockIdx.x - cur.rot) % (int)G;
    if (first < 0) first += G;
    // MoE up, and MoE down in expert-major mode, schedule their own work over every block.
    const bool all = cur.op == OP_MOE_UP || (cur.op == OP_MOE_DOWN && moe_down_em(p, cur));
    if (first < ntiles || all) {
      // MK_ASTAGE: the first attention tile's past K / V rows start copying before the wait.
      const bool astaged = MK_ASTAGE && cur.op == OP_ATTN && attn_prestage(p, cur, first, true);
      if (threadIdx.x == 0) {
        for (int d = 0; d < cur.ndeps; d++) {
          const unsigned int* c = p.done + cur.deps[d];
          while (ld_relaxed(c) < target) __nanosleep(32);
        }
        fence_acquire();
        if (p.prof) t1 = gtimer();
      } else if (!MK_DEC && MK_WPF && (threadIdx.x >> 5) == MK_CW && mma_fmt(cur.fmt)) {
        if (cur.op == OP_MATMUL) prefetch_matmul(p, s, cur, first);
        else if (cur.op == OP_ROUTER) prefetch_router(p, s, cur, first);
      }
      block_sync();
      PH_BEGIN(1)
      prep(p, s, cur);
      PH_END(1)
      if (cur.op == OP_MOE_UP) {
        op_moe_up(p, s, cur);
      } else if (all) {
        op_moe_down_em(p, s, cur);
      } else {
        const bool ko = matmul_kouter(p, cur, first, ntiles, mk_flags[0]);
        if (ko) op_matmul_kouter(p, s, cur, first, ntiles);
        for (int tile = ko ? ntiles : first; tile < ntiles; tile += G) {
          switch (cur.op) {
            case OP_MATMUL: op_matmul(p, s, cur, tile); break;
            case OP_ATTN: op_attn(p, s, cur, tile, astaged && tile == first); break;
            case OP_ROUTER: op_router(p, s, cur, tile); break;
            case OP_MOE_DOWN: op_moe_down(p, s, cur, tile); break;
            default: op_rowwise(p, s, cur, tile); break;
          }
          block_sync();
        }
      }
    } else if (p.prof && threadIdx.x == 0) {
      t1 = t0;
    }
    // Completion: publish this block's share of instruction i (release orders all prior writes of the block).
    // The descriptor is read before the barrier: past it, other threads already publish the next one.
    const int routed = cur.op == OP_MOE_UP ? (int)cur.aux : -1;
    PH_BEGIN(5)
    block_sync();
    if (threadIdx.x == 0) {
      mk_flags[1] = routed;  // SM_IV holds this MoE's routing lists
      // The barrier orders the block's writes before this thread's release (cumulative at gpu scope), so no
      // separate fence: the release is the only one on the completion path.
      red_release(p.done + i, 1u);
      PH_END(5)
      if (p.prof) {
        unsigned long long* r = p.prof + ((long long)i * G + blockIdx.x) * 4;
        r[0] = t0; r[1] = t1; r[2] = gtimer(); r[3] = mk_stat[4];  // cumulative ns consumer 0 spent in the ring
      }
    }
  }
#if MK_DEC
  __syncthreads();  // the producer's profile counters too
#else
  block_sync();
#endif
  if (p.prof && threadIdx.x < 4) p.prof[(long long)p.ninstr * G * 4 + blockIdx.x * 4 + threadIdx.x] = mk_stat[threadIdx.x];
}
