//! Encoding a plan program into the megakernel's device instruction descriptors (`DInstr`, 256 bytes each,
//! mirrored by `struct DInstr` in kernels/cuda/megakernel.cu), with the dependency lists the kernel waits on.
//!
//! Dependencies are computed from what each instruction reads and writes (arena ranges, a layer's K or V cache, the
//! MoE scratch, the sampled-token output): instruction i waits for every earlier j that writes what i reads or
//! touches what i writes, minus those already implied by another dependency.

use mimo_ir::plan::{BufId, Instr, Plan, Program};
use mimo_ir::{DType, Epilogue, KvKind};

/// Threads per block: 7 consumer warps and 1 producer warp (the bulk-copy weight ring). 8 warps, 2 per SM
/// sub-partition, leave each thread 255 registers. (12 warps, tried with the tensor-core consumers, were 10 %
/// slower: see bench/NOTES.md.)
pub const THREADS: usize = 256;

/// Threads per block of the plans this process compiles and runs: `MIMO_THREADS` (an experiment knob: a multiple
/// of 32 in 128..=512, one producer warp and the rest consumers; the shared activation buffer shrinks where the
/// consumers' partial sums need the room) or [`THREADS`]. The runtime checks it against the kernel it loads.
pub fn threads() -> usize {
    static T: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *T.get_or_init(|| match std::env::var("MIMO_THREADS") {
        Err(_) => THREADS,
        Ok(v) => match v.parse::<usize>() {
            Ok(t) if t.is_multiple_of(32) && (128..=512).contains(&t) => t,
            _ => {
                eprintln!("warning: MIMO_THREADS={v} is not a multiple of 32 in 128..=512; using {THREADS}");
                THREADS
            }
        },
    })
}
/// Bytes of the shared-memory weight ring (`RING_NS * RING_SLOT` in megakernel.cu): 3 slots of 32 rows, each a
/// 1 KB segment at a padded pitch plus its MXFP4 scale bytes, rounded up to 1 KB (tensor copies into a slot use
/// the 128-byte swizzle, whose pattern repeats every 1 KB).
pub const RING_BYTES: usize = 3 * (32 * (1024 + 64 + 80usize)).div_ceil(1024) * 1024;
/// Rows of a ring chunk (two 16-row tensor-core tiles).
pub const RING_ROWS: usize = 32;
/// Consumer warps of a block of `threads` (`MK_CW`: all warps but the producer).
pub fn consumer_warps(threads: usize) -> usize {
    threads / 32 - 1
}

/// Floats of the consumer warps' partial-sum buffer (`SM_MMR`): up to 8 tokens a double buffer of warps x one
/// 32-row group x 8 tokens; above 8, warps x one 16-row MMA tile x tokens rounded to 8.
pub fn mmr_floats(max_tokens: usize) -> usize {
    mmr_floats_for(max_tokens, threads())
}
fn mmr_floats_for(max_tokens: usize, threads: usize) -> usize {
    let cw = consumer_warps(threads);
    (cw * 2 * 32 * 8).max(cw * 16 * max_tokens.div_ceil(8) * 8)
}
pub const TILE_MAX: usize = 128;
/// Rows of a matmul tile without RoPE (RoPE tiles are head-aligned or split-pair, LM-head ones 64).
pub const MATMUL_ROWS: usize = 32;
/// Most blocks one attention tile (token, kv head, head group) is split over (`ATTN_SMAX` in megakernel.cu).
pub const ATTN_SPLITS: usize = 8;
/// Ints of the kernel's routing lists (`IV_LEN` in megakernel.cu).
pub const IV_LEN: usize = 1600;
/// Shared memory one block may use on sm_90 (the 227 KB opt-in limit) less 1 KB for the kernel's static
/// shared variables.
pub const SMEM_LIMIT: usize = 232_448 - 1024;
pub const MAX_DEPS: usize = 8;
/// The CUDA source of the megakernel body.
pub const MEGAKERNEL_CU: &str = include_str!("../cuda/megakernel.cu");

pub mod op {
    pub const EMBED: i32 = 0;
    pub const RMSNORM: i32 = 1;
    pub const MATMUL: i32 = 2;
    pub const ROPE: i32 = 3;
    pub const KVWRITE: i32 = 4;
    pub const ATTN: i32 = 5;
    pub const ROUTER: i32 = 6;
    pub const MOE_UP: i32 = 7;
    pub const MOE_DOWN: i32 = 8;
    pub const SWIGLU: i32 = 9;
    pub const SCALE: i32 = 10;
    pub const ADD: i32 = 11;
    pub const ARGMAX: i32 = 12;
}

/// Device instruction descriptor; field order and sizes match the CUDA struct exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DInstr {
    pub op: i32,
    pub ntiles: i32,
    pub tile_rows: i32,
    pub ndeps: i32,
    pub deps: [i32; 8],
    pub w: i64,
    pub ws: i64,
    pub w2: i64,
    pub ws2: i64,
    pub bias: i64,
    pub normw: i64,
    pub sinks: i64,
    pub aux: i64,
    pub x: i32,
    pub xw: i32,
    pub out: i32,
    pub outw: i32,
    pub res: i32,
    pub resw: i32,
    pub fmt: i32,
    pub n: i32,
    pub k: i32,
    pub epi: i32,
    pub nepi: i32,
    pub rot: i32,
    pub heads: i32,
    pub hd: i32,
    pub rotary: i32,
    pub layer: i32,
    pub kv_k: i32,
    pub kv_v: i32,
    pub kv_cap: i32,
    pub kvkind: i32,
    pub nh: i32,
    pub nkv: i32,
    pub qd: i32,
    pub vd: i32,
    pub window: i32,
    pub e: i32,
    pub topk: i32,
    pub ngroup: i32,
    pub topkg: i32,
    pub normtopk: i32,
    pub sigmoid: i32,
    pub inter: i32,
    pub eps: f32,
    pub scale: f32,
    pub theta: f32,
    pub rscale: f32,
}

const _: () = assert!(std::mem::size_of::<DInstr>() == 256);

impl DInstr {
    pub fn as_bytes(v: &[DInstr]) -> &[u8] {
        // SAFETY: DInstr is repr(C), Copy, has no padding (asserted size = sum of fields) and no invalid bit patterns.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
}

/// Where each layer's K and V live in the device KV buffer (f32 elements), and its ring capacity.
#[derive(Clone, Debug, Default)]
pub struct KvLayout {
    /// Indexed by layer: (k offset, v offset, capacity).
    pub layers: Vec<Option<(usize, usize, usize)>>,
    pub total: usize,
}

impl KvLayout {
    pub fn new(plan: &Plan, max_ctx: usize) -> KvLayout {
        let n = plan.kv.iter().map(|k| k.layer + 1).max().unwrap_or(0);
        let mut layers = vec![None; n];
        let mut off = 0usize;
        for d in &plan.kv {
            let cap = match d.window {
                Some(w) => (w + plan.max_tokens).min(max_ctx),
                None => max_ctx,
            };
            let k = off;
            off += cap * d.heads * d.k_dim;
            let v = off;
            off += cap * d.heads * d.v_dim;
            layers[d.layer] = Some((k, v, cap));
        }
        KvLayout { layers, total: off }
    }
}

/// The megakernel feeds bf16 / FP8 / MXFP4 weights to the tensor cores in 32-element K steps: rows must hold
/// whole steps (which also keeps every row 16-byte aligned for the bulk copies).
fn check_k(w: &mimo_ir::plan::WeightDesc) -> Result<(), String> {
    let k = *w.dims.last().unwrap_or(&0);
    let piece = match w.dtype {
        DType::BF16 | DType::F8E4M3 | DType::MXFP4 => 32,
        DType::F16 => 8,
        _ => 1,
    };
    if !k.is_multiple_of(piece) {
        return Err(format!(
            "weight {}: K = {k} is not a multiple of {piece} ({})",
            w.name,
            w.dtype.name()
        ));
    }
    Ok(())
}

/// Device weight-format codes (`DInstr::fmt`, `enum Fmt` in megakernel.cu).
pub mod fmt {
    pub const F32: i32 = 0;
    pub const BF16: i32 = 1;
    pub const F16: i32 = 2;
    pub const F8: i32 = 3;
    pub const MXFP4: i32 = 4;
}

fn fmt_of(d: DType) -> i32 {
    match d {
        DType::F32 => fmt::F32,
        DType::BF16 => fmt::BF16,
        DType::F16 => fmt::F16,
        DType::F8E4M3 => fmt::F8,
        DType::MXFP4 => fmt::MXFP4,
        _ => -1,
    }
}

/// A resource an instruction touches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Res {
    Arena(usize, usize),
    /// A layer's K (false) or V (true) cache: separate regions, so the k and v projections of a layer do not
    /// wait for each other.
    Kv(usize, bool),
    Scratch,
    Tokens,
}

fn overlaps(a: Res, b: Res) -> bool {
    match (a, b) {
        (Res::Arena(a0, a1), Res::Arena(b0, b1)) => a0 < b1 && b0 < a1,
        (Res::Kv(x, a), Res::Kv(y, b)) => x == y && a == b,
        (Res::Scratch, Res::Scratch) | (Res::Tokens, Res::Tokens) => true,
        _ => false,
    }
}

/// The encoded program plus what the runtime must allocate.
pub struct Encoded {
    pub instrs: Vec<DInstr>,
    pub kv: KvLayout,
    /// f32 elements of MoE scratch.
    pub scratch_len: usize,
    /// Dynamic shared memory bytes per block.
    pub smem_bytes: usize,
    /// Arena offset of the logits buffer.
    pub logits: (usize, usize),
}

/// Column tile of MoE down's expert-major mode (default): one ring row group. The kernel splits (routed expert,
/// tile) items over the blocks by cost and counts a tile's expert arrivals. `max_tokens` members times a tile must
/// fit the tile stage (so must any width `MIMO_MOE_DOWN_COLS`, an experiment knob, asks for).
pub fn moe_down_cols(max_tokens: usize) -> usize {
    std::env::var("MIMO_MOE_DOWN_COLS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&c| {
            c % RING_ROWS == 0 && c > 0 && max_tokens.max(1) * c <= stage_floats(max_tokens)
        })
        .unwrap_or(RING_ROWS)
}

/// Floats of the tile-output stage (`MK_STAGE`).
pub fn stage_floats(max_tokens: usize) -> usize {
    (3 * max_tokens * TILE_MAX).max(1024)
}

/// Floats of the shared activation buffer (`MK_XS`): 64 KB (4 tokens x 4096 at full width), so that with the
/// weight ring and the other regions a block leaves part of the SM's 256 KB of L1/shared memory as L1 cache
/// (register spills, the stack, scale bytes). Never more than the opt-in limit leaves.
pub fn xs_floats(max_tokens: usize) -> usize {
    xs_floats_for(max_tokens, threads())
}
fn xs_floats_for(max_tokens: usize, threads: usize) -> usize {
    let floats = (SMEM_LIMIT - RING_BYTES) / 4;
    let room = (floats - other_floats(max_tokens, threads)) / 1024 * 1024;
    room.min(XS_TARGET)
}

/// Floats of the shared regions after the activation buffer, in kernel order: stage, reductions (`SM_RED`), norm
/// factors (`SM_INV`), routing lists (`SM_IV`), the consumers' partial sums (`SM_MMR`).
fn other_floats(max_tokens: usize, threads: usize) -> usize {
    stage_floats(max_tokens) + threads + max_tokens + IV_LEN + mmr_floats_for(max_tokens, threads)
}
const _: () = assert!(
    XS_TARGET >= 256 * 32,
    "256 routed pairs x one 32-wide chunk must fit"
);

/// Preferred size of the shared activation buffer in floats.
pub const XS_TARGET: usize = 16_384;

/// Dynamic shared memory bytes per block.
pub fn smem_bytes(max_tokens: usize) -> usize {
    smem_bytes_for(max_tokens, threads())
}
fn smem_bytes_for(max_tokens: usize, threads: usize) -> usize {
    RING_BYTES + 4 * (xs_floats_for(max_tokens, threads) + other_floats(max_tokens, threads))
}

/// Rows of a split-pair RoPE tile for a head of `head_dim` with `rotary` rotated dims: the largest R in
/// {32, 16, 8} with R <= rotary, R | rotary and R | head_dim - rotary (each head then splits into rotary / R
/// tiles of R / 2 pairs and (head_dim - rotary) / R plain ones, all R rows); None when there is none (odd pair
/// counts, tiny heads), and the kernel uses head-aligned tiles.
pub fn rope_split_rows(head_dim: usize, rotary: usize) -> Option<usize> {
    [32, 16, 8].into_iter().find(|&r| {
        r <= rotary
            && rotary.is_multiple_of(r)
            && head_dim >= rotary
            && (head_dim - rotary).is_multiple_of(r)
    })
}

/// K splits of a router's logits (split width in elements, count): about 8 splits of a multiple of 32 columns, at
/// most 512 (one 1 KB bf16 ring segment), so the router spreads over blocks.
fn router_splits(k: usize) -> (usize, usize) {
    let kw = if k.is_multiple_of(32) {
        (k.div_ceil(8).div_ceil(32) * 32).clamp(32, 512)
    } else {
        k
    };
    (kw, k.div_ceil(kw))
}

/// A router computed by the epilogue of the matmul just before it (the attention output projection with its
/// residual add): each of the matmul's tiles leaves `W_r[:, cols] . (g * h[cols])` for every token and expert
/// (g the router's RMSNorm weight, h the matmul's output columns) and the tokens' sums of squares over its
/// columns; the MoE instructions add the tiles' shares in tile order and scale by 1 / rms. One serial
/// instruction per MoE layer fewer. Taken only when the partials stay small: every block of the MoE reads all of
/// them (tiles x T x experts), so a many-expert router keeps its own instruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedRouter {
    /// Program index of the matmul.
    pub matmul: usize,
    /// Routing buffer the router writes.
    pub routing: BufId,
    /// Matmul tiles (32-row, the matmul's own) = partial-logit splits.
    pub tiles: usize,
    pub experts: usize,
    /// Router weight (byte offset, device format), its RMSNorm weight and eps, input width.
    pub w: u64,
    pub fmt: i32,
    pub normw: u64,
    pub eps: f32,
    pub k: usize,
}

/// Most floats of fused-router partials (tiles x T x experts) every MoE block reads in its preparation.
pub const FUSED_ROUTER_MAX: usize = 32_768;

pub struct FusedRouters(Vec<FusedRouter>);

impl FusedRouters {
    pub fn by_matmul(&self, i: usize) -> Option<&FusedRouter> {
        self.0.iter().find(|f| f.matmul == i)
    }
    pub fn by_routing(&self, b: BufId) -> Option<&FusedRouter> {
        self.0.iter().find(|f| f.routing == b)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The routers of `program` that the preceding matmul's epilogue computes (see [`FusedRouter`]): a router with
/// an RMSNorm prologue right after the matmul that writes its input, a plain matmul (no RoPE / KV write /
/// SwiGLU) over exactly the router's K columns, a f32 / bf16 / f16 router weight, the MoE it feeds normalizing the
/// same input with the same norm, and partials within [`FUSED_ROUTER_MAX`] and the tile stage.
pub fn fused_routers(plan: &Plan, program: &Program, max_tokens: usize) -> FusedRouters {
    let mut v = vec![];
    for (i, pair) in program.instrs.windows(2).enumerate() {
        let (
            Instr::MatMul {
                w: mw,
                epilogue,
                out: mo,
                ..
            },
            Instr::Router {
                x,
                w,
                norm: Some((nw, eps)),
                out: routing,
                spec,
                ..
            },
        ) = (&pair[0], &pair[1])
        else {
            continue;
        };
        let plain = epilogue
            .iter()
            .all(|e| matches!(e, Epilogue::ResidualAdd | Epilogue::Scale(_)));
        let (mwt, rwt) = (&plan.weights[*mw as usize], &plan.weights[*w as usize]);
        let k = rwt.dims[1];
        let moe_ok = program.instrs.iter().any(|m| {
            matches!(m, Instr::Moe { x: mx, routing: r, norm: Some((mn, me)), .. }
                if r == routing && mx == x && mn == nw && me == eps)
        });
        let fmt = fmt_of(rwt.dtype);
        let tiles = mwt.dims[0].div_ceil(MATMUL_ROWS);
        let e = spec.n_experts;
        if mo != x
            || !plain
            || !moe_ok
            || !matches!(rwt.dtype, DType::F32 | DType::BF16 | DType::F16)
            || mwt.dims[0] != k
            || plan.buffers[*x as usize].width != k
            || tiles * max_tokens * e > FUSED_ROUTER_MAX
            || max_tokens * 2 * MATMUL_ROWS + e * (MATMUL_ROWS + 1) > stage_floats(max_tokens)
        {
            continue;
        }
        v.push(FusedRouter {
            matmul: i,
            routing: *routing,
            tiles,
            experts: e,
            w: rwt.offset,
            fmt,
            normw: plan.weights[*nw as usize].offset,
            eps: *eps,
            k,
        });
    }
    FusedRouters(v)
}

/// Device-lowering choices of [`encode_with`].
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    /// Compute routers in the preceding matmul's epilogue where [`fused_routers`] allows it.
    pub fuse_routers: bool,
    /// A layer's K and V caches are separate resources (the v projection does not wait for the k projection);
    /// false treats them as one, the pre-v13 dependency (kept as an A/B knob).
    pub split_kv: bool,
}

impl EncodeOptions {
    /// The defaults, with `MIMO_ROUTER_FUSE=0` (an experiment knob) keeping every router its own instruction.
    pub fn from_env() -> Self {
        EncodeOptions {
            fuse_routers: std::env::var_os("MIMO_ROUTER_FUSE").is_none_or(|v| v != "0"),
            split_kv: std::env::var_os("MIMO_KV_SPLIT").is_none_or(|v| v != "0"),
        }
    }
}

/// Encode `program` of `plan` with [`EncodeOptions::from_env`]. `argmax` appends an in-kernel argmax / Gumbel
/// sampling of the logits.
pub fn encode(
    plan: &Plan,
    program: &Program,
    max_ctx: usize,
    argmax: bool,
) -> Result<Encoded, String> {
    encode_with(plan, program, max_ctx, argmax, EncodeOptions::from_env())
}

/// Encode `program` of `plan` with explicit lowering options.
pub fn encode_with(
    plan: &Plan,
    program: &Program,
    max_ctx: usize,
    argmax: bool,
    opts: EncodeOptions,
) -> Result<Encoded, String> {
    if plan.max_tokens > 16 {
        return Err(format!(
            "the megakernel handles up to 16 tokens per forward, plan has {}",
            plan.max_tokens
        ));
    }
    let kv = KvLayout::new(plan, max_ctx);
    if kv.total > i32::MAX as usize {
        return Err(format!(
            "KV cache of {} floats is too large for the device encoding; lower --max-ctx",
            kv.total
        ));
    }
    let bufs = &plan.buffers;
    let mt = plan.max_tokens;
    let arena = |b: BufId| {
        let d = &bufs[b as usize];
        Res::Arena(d.offset, d.offset + d.width * mt)
    };
    let wd = |w: u32| &plan.weights[w as usize];
    for w in &plan.weights {
        if w.dims.len() >= 2 {
            check_k(w)?;
        }
    }
    let fused = if opts.fuse_routers {
        fused_routers(plan, program, mt)
    } else {
        FusedRouters(vec![])
    };
    let mut out: Vec<(DInstr, Vec<Res>, Vec<Res>)> = vec![];
    // Scratch (f32): [MoE up -> down activations | router partial logits | attention split counters | attention
    // split partials | MoE down expert-major per-pair outputs | their column-block counters | LM-head sampling
    // candidates].
    let mut moe_len = 0usize;
    // MoE down, expert-major mode (see `moe_down_cols`): per-pair outputs and per-column-tile counters; its
    // items cost `em_w` per K pass of the members' activations plus the members (`pass_cost` in the kernel;
    // `MIMO_MOE_DOWN_W`, an experiment knob).
    let em_cols = moe_down_cols(mt);
    let em_w = std::env::var("MIMO_MOE_DOWN_W")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&w| w > 0)
        .unwrap_or(64);
    let mut moe_y_len = 0usize;
    let mut moe_ctr_len = 0usize;
    let mut router_len = 0usize;
    let mut attn_heads = 0usize;
    let mut attn_len = 0usize;
    for ins in &program.instrs {
        match ins {
            Instr::Moe {
                top_k, inter, down, ..
            } => {
                moe_len = moe_len.max(mt * top_k * inter);
                let h = wd(*down).dims[1];
                moe_y_len = moe_y_len.max(mt * top_k * h);
                moe_ctr_len = moe_ctr_len.max(h.div_ceil(em_cols));
            }
            Instr::Router { w, spec, out, .. } => {
                let k = wd(*w).dims[1];
                router_len = router_len.max(match fused.by_routing(*out) {
                    // Per matmul tile: T x E partial logits, then T sums of squares after all of them.
                    Some(f) => f.tiles * mt * (spec.n_experts + 1),
                    None => router_splits(k).1 * mt * spec.n_experts,
                });
            }
            Instr::Attention { spec, .. } => {
                attn_heads = attn_heads.max(mt * spec.n_heads);
                attn_len = attn_len.max(mt * spec.n_heads * ATTN_SPLITS * (spec.v_head_dim + 4));
            }
            _ => {}
        }
    }
    let router_off = moe_len;
    // Arrival counters sit just below the partials (the kernel indexes them downwards from the partials); a
    // split's partial is its max, sum, two unused floats and the outputs, read as 16-byte vectors (`APS`).
    let attn_off = (router_off + router_len + attn_heads).next_multiple_of(4);
    // Regions after the attention partials start on 16-byte boundaries (the LM-head candidates are read as
    // float2 pairs).
    let moe_y_off = (attn_off + attn_len).next_multiple_of(4);
    let moe_ctr_off = (moe_y_off + moe_y_len).next_multiple_of(4);
    let cand_off = (moe_ctr_off + moe_ctr_len).next_multiple_of(4);
    let force_em = std::env::var_os("MIMO_MOE_DOWN_EM").is_some_and(|v| v == "1");
    // MIMO_ROPE_SPLIT=1 (an experiment knob): split-pair RoPE tiles where they fit. Off by default: on the
    // bench plan their 32-row q / k tiles balance the blocks better but cost more per tile than that gains
    // (s7r5: T = 1 13.32 vs 12.85 ms, T = 16 47.76 vs 45.83 ms with head-aligned 64-row tiles).
    let rope_split = std::env::var_os("MIMO_ROPE_SPLIT").is_some_and(|v| v == "1");
    // MIMO_LMHEAD_ROWS=32|64|96|128 (an experiment knob): rows per LM-head tile (default 64).
    let lm_rows = std::env::var("MIMO_LMHEAD_ROWS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|r| r % 32 == 0 && (32..=TILE_MAX).contains(r))
        .unwrap_or(64);
    let mut scratch_len = cand_off;
    let mut lm_tiles = 0i32;
    let base = |op: i32| DInstr {
        op,
        bias: -1,
        normw: -1,
        sinks: -1,
        aux: -1,
        x: -1,
        out: -1,
        res: -1,
        ..Default::default()
    };
    let kvslot = |layer: usize| -> Result<(usize, usize, usize), String> {
        kv.layers
            .get(layer)
            .copied()
            .flatten()
            .ok_or_else(|| format!("layer {layer} has no KV cache"))
    };
    for (ii, ins) in program.instrs.iter().enumerate() {
        match ins {
            Instr::Embed { table, out: o } => {
                let w = wd(*table);
                let mut d = base(op::EMBED);
                d.w = w.offset as i64;
                d.fmt = fmt_of(w.dtype);
                d.k = w.dims[1] as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.ntiles = -1;
                out.push((d, vec![], vec![arena(*o)]));
            }
            Instr::RmsNorm { x, w, out: o, eps } => {
                let mut d = base(op::RMSNORM);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.k = d.xw;
                d.normw = wd(*w).offset as i64;
                d.eps = *eps;
                d.ntiles = -1;
                out.push((d, vec![arena(*x)], vec![arena(*o)]));
            }
            Instr::MatMul {
                x,
                w,
                bias,
                norm,
                residual,
                epilogue,
                out: o,
            } => {
                let wt = wd(*w);
                let mut d = base(op::MATMUL);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.n = wt.dims[0] as i32;
                d.k = wt.dims[1] as i32;
                d.w = wt.offset as i64;
                d.ws = wt.scale_offset as i64;
                d.fmt = fmt_of(wt.dtype);
                if let Some(b) = bias {
                    d.bias = wd(*b).offset as i64;
                }
                if let Some((nw, eps)) = norm {
                    d.normw = wd(*nw).offset as i64;
                    d.eps = *eps;
                }
                let mut reads = vec![arena(*x)];
                let mut writes = vec![];
                if let Some(r) = residual {
                    d.res = bufs[*r as usize].offset as i32;
                    d.resw = bufs[*r as usize].width as i32;
                    reads.push(arena(*r));
                }
                let mut tile_rows = MATMUL_ROWS;
                let mut swiglu = false;
                let mut ends_kv = false;
                for (q, e) in epilogue.iter().enumerate() {
                    let code = match e {
                        Epilogue::Scale(s) => {
                            d.scale = *s;
                            1
                        }
                        Epilogue::Rope(r) => {
                            d.hd = r.head_dim as i32;
                            d.rotary = r.rotary_dim as i32;
                            d.theta = r.theta;
                            match rope_split_rows(r.head_dim, r.rotary_dim).filter(|_| rope_split) {
                                // Split-pair tiles (EPI_ROPE2): R rows each, a rotary tile holding R/2
                                // rotated pairs (i, i + rot/2) as two row runs.
                                Some(rows) => {
                                    tile_rows = rows;
                                    6
                                }
                                // Head-aligned tiles: they start on head boundaries or past the rotary dims,
                                // so every rotated pair lies in one tile: the smallest divisor of head_dim
                                // >= max(rot, 32).
                                None => {
                                    tile_rows = (r.rotary_dim.max(32)..=r.head_dim)
                                        .find(|t| r.head_dim % t == 0)
                                        .unwrap_or(r.head_dim);
                                    2
                                }
                            }
                        }
                        Epilogue::KvWrite {
                            layer,
                            kind,
                            heads,
                            head_dim,
                        } => {
                            let (k, v, cap) = kvslot(*layer)?;
                            d.kv_k = k as i32;
                            d.kv_v = v as i32;
                            d.kv_cap = cap as i32;
                            d.kvkind = if *kind == KvKind::K { 0 } else { 1 };
                            d.heads = *heads as i32;
                            d.layer = *layer as i32;
                            if !epilogue.iter().any(|e| matches!(e, Epilogue::Rope(_))) {
                                d.hd = *head_dim as i32;
                            }
                            writes.push(Res::Kv(*layer, opts.split_kv && *kind == KvKind::V));
                            ends_kv = q + 1 == epilogue.len();
                            3
                        }
                        Epilogue::SwiGlu => {
                            swiglu = true;
                            4
                        }
                        Epilogue::ResidualAdd => 5,
                    };
                    if q >= 6 {
                        return Err("more than 6 epilogue stages".into());
                    }
                    d.epi |= code << (4 * q);
                }
                d.nepi = epilogue.len() as i32;
                if tile_rows > TILE_MAX {
                    return Err(format!(
                        "head_dim {tile_rows} exceeds the megakernel tile limit {TILE_MAX}"
                    ));
                }
                let outn = if swiglu { wt.dims[0] / 2 } else { wt.dims[0] };
                d.tile_rows = tile_rows as i32;
                d.ntiles = outn.div_ceil(tile_rows) as i32;
                if let Some(f) = fused.by_matmul(ii) {
                    // The next router's logits as an epilogue (see `FusedRouter`): router weight, its format
                    // and norm weight, and where the tiles' partials go.
                    debug_assert_eq!(f.tiles, d.ntiles as usize);
                    d.e = f.experts as i32;
                    d.w2 = f.w as i64;
                    d.inter = f.fmt;
                    d.sinks = f.normw as i64;
                    d.ws2 = router_off as i64;
                    writes.push(Res::Scratch);
                }
                if !ends_kv {
                    d.out = bufs[*o as usize].offset as i32;
                    d.outw = bufs[*o as usize].width as i32;
                    writes.push(arena(*o));
                }
                out.push((d, reads, writes));
            }
            Instr::Rope { x, out: o, spec } => {
                let mut d = base(op::ROPE);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.k = d.xw;
                d.hd = spec.head_dim as i32;
                d.rotary = spec.rotary_dim as i32;
                d.theta = spec.theta;
                d.ntiles = -1;
                out.push((d, vec![arena(*x)], vec![arena(*o)]));
            }
            Instr::KvWrite { x, layer, kind } => {
                let (k, v, cap) = kvslot(*layer)?;
                let mut d = base(op::KVWRITE);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.k = d.xw;
                d.kv_k = k as i32;
                d.kv_v = v as i32;
                d.kv_cap = cap as i32;
                d.kvkind = if *kind == KvKind::K { 0 } else { 1 };
                d.ntiles = -1;
                out.push((
                    d,
                    vec![arena(*x)],
                    vec![Res::Kv(*layer, opts.split_kv && *kind == KvKind::V)],
                ));
            }
            Instr::Attention {
                q,
                sinks,
                out: o,
                spec,
            } => {
                let (k, v, cap) = kvslot(spec.layer)?;
                let mut d = base(op::ATTN);
                d.x = bufs[*q as usize].offset as i32;
                d.xw = bufs[*q as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.kv_k = k as i32;
                d.kv_v = v as i32;
                d.kv_cap = cap as i32;
                d.nh = spec.n_heads as i32;
                d.nkv = spec.n_kv_heads as i32;
                d.qd = spec.head_dim as i32;
                d.vd = spec.v_head_dim as i32;
                if spec.v_head_dim > 256 || spec.head_dim > 256 {
                    return Err(
                        "attention head dims exceed the megakernel limits (v <= 256, qk <= 256)"
                            .into(),
                    );
                }
                // K / V rows are staged with 16-byte copies; a tile's query heads share one kv head.
                if spec.head_dim % 4 != 0 || spec.v_head_dim % 4 != 0 {
                    return Err(format!(
                        "attention head dims {} / {} are not multiples of 4 (the megakernel stages K / V rows \
                         in 16-byte pieces)",
                        spec.head_dim, spec.v_head_dim
                    ));
                }
                if spec.n_kv_heads == 0
                    || spec.n_heads % spec.n_kv_heads != 0
                    || spec.n_heads / spec.n_kv_heads > 128
                {
                    return Err(format!(
                        "attention with {} heads over {} kv heads: the megakernel needs a whole number of \
                         query heads per kv head, at most 128",
                        spec.n_heads, spec.n_kv_heads
                    ));
                }
                d.window = spec.window.map(|w| w as i32).unwrap_or(0);
                d.scale = spec.scale;
                if let Some(s) = sinks {
                    d.sinks = wd(*s).offset as i64;
                }
                d.layer = spec.layer as i32;
                // Per token, one per head (the kernel takes a kv head's query heads together: its own tile
                // count is T x kv heads x attn_splits; this one staggers the instruction's first block).
                d.ntiles = -(spec.n_heads as i32);
                d.aux = attn_off as i64;
                out.push((
                    d,
                    vec![
                        arena(*q),
                        Res::Kv(spec.layer, false),
                        Res::Kv(spec.layer, true),
                    ],
                    vec![arena(*o), Res::Scratch],
                ));
            }
            Instr::Router {
                x,
                w,
                bias,
                norm,
                out: routing,
                spec,
            } => {
                if fused.by_routing(*routing).is_some() {
                    // Computed by the previous matmul's epilogue.
                    continue;
                }
                // Partial logits over K splits into scratch; the MoE instructions finish the routing.
                let wt = wd(*w);
                let mut d = base(op::ROUTER);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.w = wt.offset as i64;
                d.ws = wt.scale_offset as i64;
                d.fmt = fmt_of(wt.dtype);
                d.k = wt.dims[1] as i32;
                d.e = spec.n_experts as i32;
                if 2 * mt * spec.n_experts > xs_floats(mt)
                    || spec.n_group > 32
                    || wt.dims[1] > xs_floats(mt)
                {
                    return Err(format!(
                        "router sizes exceed the megakernel limits for max_tokens {mt}: {} experts, {} groups, hidden {}",
                        spec.n_experts, spec.n_group, wt.dims[1]
                    ));
                }
                if let Some(b) = bias {
                    d.bias = wd(*b).offset as i64;
                }
                if let Some((nw, eps)) = norm {
                    d.normw = wd(*nw).offset as i64;
                    d.eps = *eps;
                }
                let (kw, nks) = router_splits(wt.dims[1]);
                d.n = kw as i32;
                d.ws2 = nks as i64;
                d.w2 = router_off as i64;
                d.tile_rows = if spec.n_experts >= 32 { 32 } else { 16 };
                d.ntiles = (spec.n_experts.div_ceil(d.tile_rows as usize) * nks) as i32;
                out.push((d, vec![arena(*x)], vec![Res::Scratch]));
            }
            Instr::Moe {
                x,
                routing,
                gate_up,
                down,
                norm,
                residual,
                out: o,
                top_k,
                inter,
            } => {
                let gu = wd(*gate_up);
                let dn = wd(*down);
                let h = gu.dims[2];
                if h % 4 != 0 {
                    // MoE down's expert-major combine reads four output columns at a time.
                    return Err(format!("MoE hidden size {h} is not a multiple of 4"));
                }
                // The router that fills `routing`: its partial logits are where the MoE instructions route from.
                let rins = program
                    .instrs
                    .iter()
                    .find_map(|i| match i {
                        Instr::Router {
                            w, bias, out, spec, ..
                        } if out == routing => Some((w, bias, spec)),
                        _ => None,
                    })
                    .ok_or("MoE routing buffer is not written by a router in this program")?;
                let route = |d: &mut DInstr| {
                    let (w, bias, spec) = rins;
                    d.e = spec.n_experts as i32;
                    d.topk = spec.top_k as i32;
                    d.ngroup = spec.n_group as i32;
                    d.topkg = spec.topk_group as i32;
                    d.normtopk = spec.norm_topk_prob as i32;
                    d.sigmoid = spec.sigmoid as i32;
                    d.rscale = spec.scaling;
                    d.bias = bias.map(|b| wd(b).offset as i64).unwrap_or(-1);
                    d.w2 = router_off as i64;
                    match fused.by_routing(*routing) {
                        // Partials of a fused router: -(matmul tiles), then 1 / rms from the tiles' sums of
                        // squares over the router's K (qd) with its norm's eps (theta).
                        Some(f) => {
                            d.ws2 = -(f.tiles as i64);
                            d.qd = f.k as i32;
                            d.theta = f.eps;
                        }
                        None => d.ws2 = router_splits(wd(*w).dims[1]).1 as i64,
                    }
                };
                // The kernel dedupes the routed experts in a 256-entry shared-memory list.
                if mt * top_k > 256 || mt * top_k * 32 > stage_floats(mt) {
                    return Err(format!(
                        "max_tokens {mt} x top_k {top_k} exceeds the megakernel's routed slots (256, and top_k <= 12)"
                    ));
                }
                let n_experts = gu.dims[0];
                if n_experts > 48 * 32 {
                    return Err(format!(
                        "{n_experts} experts exceed the megakernel's routing bitmap (1536)"
                    ));
                }
                if rins.2.n_experts != n_experts {
                    return Err(format!(
                        "router has {} experts, MoE weights have {n_experts}",
                        rins.2.n_experts
                    ));
                }
                let mut up = base(op::MOE_UP);
                up.x = bufs[*x as usize].offset as i32;
                up.xw = bufs[*x as usize].width as i32;
                up.aux = bufs[*routing as usize].offset as i64;
                up.w = gu.offset as i64;
                up.ws = gu.scale_offset as i64;
                up.fmt = fmt_of(gu.dtype);
                up.k = h as i32;
                up.inter = *inter as i32;
                up.topk = *top_k as i32;
                up.tile_rows = 32;
                route(&mut up);
                if let Some((nw, eps)) = norm {
                    up.normw = wd(*nw).offset as i64;
                    up.eps = *eps;
                }
                let ctiles = inter.div_ceil(32);
                up.ntiles = -((top_k * ctiles) as i32);
                // Block 0 also writes the routing buffer (what the CPU interpreter's router produces).
                out.push((
                    up,
                    vec![arena(*x), Res::Scratch],
                    vec![Res::Scratch, arena(*routing)],
                ));
                let mut dd = base(op::MOE_DOWN);
                dd.aux = bufs[*routing as usize].offset as i64;
                dd.out = bufs[*o as usize].offset as i32;
                dd.outw = bufs[*o as usize].width as i32;
                dd.w = dn.offset as i64;
                dd.ws = dn.scale_offset as i64;
                dd.fmt = fmt_of(dn.dtype);
                dd.n = h as i32;
                dd.inter = *inter as i32;
                dd.topk = *top_k as i32;
                dd.tile_rows = 32;
                route(&mut dd);
                dd.ntiles = h.div_ceil(32) as i32;
                // Expert-major mode (taken in the kernel when the pairs' activations do not fit in shared
                // memory, or always with the MIMO_MOE_DOWN_EM=1 test knob): column block width, per-pair
                // outputs and arrival counters in scratch.
                dd.window = em_cols as i32;
                dd.vd = em_w;
                dd.kv_k = moe_y_off as i32;
                dd.kv_v = moe_ctr_off as i32;
                dd.heads = force_em as i32;
                let mut reads = vec![Res::Scratch, arena(*routing)];
                if let Some(r) = residual {
                    dd.res = bufs[*r as usize].offset as i32;
                    dd.resw = bufs[*r as usize].width as i32;
                    reads.push(arena(*r));
                }
                out.push((dd, reads, vec![arena(*o)]));
            }
            Instr::SwiGlu { x, out: o } | Instr::Scale { x, out: o, .. } => {
                let mut d = base(if matches!(ins, Instr::SwiGlu { .. }) {
                    op::SWIGLU
                } else {
                    op::SCALE
                });
                if let Instr::Scale { factor, .. } = ins {
                    d.scale = *factor;
                }
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.k = d.xw;
                d.ntiles = -1;
                out.push((d, vec![arena(*x)], vec![arena(*o)]));
            }
            Instr::Add { a, b, out: o } => {
                let mut d = base(op::ADD);
                d.x = bufs[*a as usize].offset as i32;
                d.xw = bufs[*a as usize].width as i32;
                d.res = bufs[*b as usize].offset as i32;
                d.resw = bufs[*b as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.k = d.xw;
                d.ntiles = -1;
                out.push((d, vec![arena(*a), arena(*b)], vec![arena(*o)]));
            }
            Instr::LmHead { x, w, norm, out: o } => {
                let wt = wd(*w);
                let mut d = base(op::MATMUL);
                d.x = bufs[*x as usize].offset as i32;
                d.xw = bufs[*x as usize].width as i32;
                d.out = bufs[*o as usize].offset as i32;
                d.outw = bufs[*o as usize].width as i32;
                d.n = wt.dims[0] as i32;
                d.k = wt.dims[1] as i32;
                d.w = wt.offset as i64;
                d.ws = wt.scale_offset as i64;
                d.fmt = fmt_of(wt.dtype);
                if let Some((nw, eps)) = norm {
                    d.normw = wd(*nw).offset as i64;
                    d.eps = *eps;
                }
                d.tile_rows = lm_rows as i32;
                d.ntiles = wt.dims[0].div_ceil(lm_rows) as i32;
                let mut writes = vec![arena(*o)];
                if argmax && program.output("logits") == Some(*o) {
                    // Each tile leaves its best sampling candidate per token for the argmax instruction.
                    d.aux = cand_off as i64;
                    lm_tiles = d.ntiles;
                    scratch_len = scratch_len.max(cand_off + 2 * mt * d.ntiles as usize);
                    writes.push(Res::Scratch);
                }
                out.push((d, vec![arena(*x)], writes));
            }
            Instr::LoadInput { .. } | Instr::HeadRmsNorm { .. } | Instr::BlockAttention { .. } => {
                return Err(format!(
                    "instruction {} (DFlash draft) is not supported by the megakernel yet",
                    ins.mnemonic()
                ));
            }
        }
    }
    let logits_buf = program
        .output("logits")
        .ok_or("program has no logits output")?;
    let lb = &bufs[logits_buf as usize];
    if argmax {
        let mut d = base(op::ARGMAX);
        d.x = lb.offset as i32;
        d.xw = lb.width as i32;
        d.k = lb.width as i32;
        d.ntiles = -1;
        let mut reads = vec![arena(logits_buf)];
        if lm_tiles > 0 {
            d.aux = cand_off as i64;
            d.n = lm_tiles;
            reads.push(Res::Scratch);
        }
        out.push((d, reads, vec![Res::Tokens]));
    }
    // Dependencies, then drop those implied transitively by a later dependency.
    let n = out.len();
    let mut deps: Vec<Vec<usize>> = vec![vec![]; n];
    let mut anc: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); n];
    for i in 0..n {
        let mut ds: Vec<usize> = vec![];
        for j in (0..i).rev() {
            let (_, rj, wj) = &out[j];
            let (_, ri, wi) = &out[i];
            let conflict = wj
                .iter()
                .any(|&a| ri.iter().chain(wi).any(|&b| overlaps(a, b)))
                || rj.iter().any(|&a| wi.iter().any(|&b| overlaps(a, b)));
            if conflict && !ds.iter().any(|&d| anc[d].contains(&j)) {
                ds.push(j);
            }
        }
        let mut a = std::collections::BTreeSet::new();
        for &d in &ds {
            a.insert(d);
            a.extend(anc[d].iter().copied());
        }
        anc[i] = a;
        // Keep only dependencies not implied by another kept one.
        let keep: Vec<usize> = ds
            .iter()
            .copied()
            .filter(|&d| !ds.iter().any(|&e| e != d && anc[e].contains(&d)))
            .collect();
        if keep.len() > MAX_DEPS {
            return Err(format!(
                "instruction {i} has {} direct dependencies (max {MAX_DEPS})",
                keep.len()
            ));
        }
        deps[i] = keep;
    }
    let mut rot = 0i64;
    let instrs = out
        .into_iter()
        .enumerate()
        .map(|(i, (mut d, _, _))| {
            d.ndeps = deps[i].len() as i32;
            for (k, &j) in deps[i].iter().enumerate() {
                d.deps[k] = j as i32;
            }
            d.rot = (rot % 1_000_003) as i32;
            rot += d.ntiles.unsigned_abs() as i64;
            d
        })
        .collect();
    if scratch_len > i32::MAX as usize {
        return Err(format!(
            "device scratch of {scratch_len} floats exceeds the encoding's 32-bit offsets"
        ));
    }
    Ok(Encoded {
        instrs,
        kv,
        scratch_len: scratch_len.max(1),
        smem_bytes: smem_bytes(mt),
        logits: (lb.offset, lb.width),
    })
}

/// Value of `#define NAME <int>` in the megakernel source (the tests' check that Rust constants match the kernel).
#[cfg(test)]
pub(crate) fn cu_define(name: &str) -> usize {
    let key = format!("#define {name} ");
    let line = MEGAKERNEL_CU
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("{name} not defined in megakernel.cu"));
    line[key.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not an integer: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_layout_matches_the_kernel_and_fits_the_sm() {
        // The weight ring the encoder budgets for is the one the kernel declares.
        let (ns, rows, seg) = (
            cu_define("RING_NS"),
            cu_define("RING_ROWS"),
            cu_define("RING_SEG"),
        );
        let (pad, sstr) = (cu_define("RING_PADMAX"), cu_define("RING_SSTR"));
        // Slots are rounded up to 1 KB (the 128-byte swizzle of tensor copies repeats every 1 KB).
        let slot = (rows * (seg + pad + sstr)).div_ceil(1024) * 1024;
        assert!(MEGAKERNEL_CU.contains("+ 1023) & ~1023)"));
        assert_eq!(RING_BYTES, ns * slot);
        assert_eq!(RING_ROWS, rows);
        // A tensor-copied slot: two 16-row halves of 16 KB, then their MXFP4 scales (16 rows x 64 B each).
        let tscale = cu_define("RING_TSCALE_OFF");
        assert!(2 * 16 * seg <= tscale && tscale + 2 * 16 * 64 <= slot);
        // A segment's MXFP4 scale bytes fit their pitch, which keeps 16-byte copy alignment.
        assert!(seg / 16 <= sstr && sstr % 16 == 0);
        // One producer warp plus the consumer warps; a chunk is whole 16-row MMA tiles, one row per producer lane.
        assert!(MEGAKERNEL_CU.contains("#define MK_CW (MK_WARPS - 1)"));
        assert!(threads().is_multiple_of(32) && consumer_warps(threads()) >= 1);
        assert!(rows % 16 == 0 && rows <= 32);
        assert_eq!(IV_LEN, cu_define("IV_LEN"));
        assert_eq!(ATTN_SPLITS, cu_define("ATTN_SMAX"));
        // Every block size MIMO_THREADS accepts.
        for t in (128..=512).step_by(32) {
            for mt in 1..=16 {
                let total = smem_bytes_for(mt, t);
                assert!(
                    total <= SMEM_LIMIT,
                    "{t} threads, mt {mt}: {total} bytes of shared memory"
                );
                // 256 routed pairs x one 32-wide chunk fit (and so a decode token's 4096 activations).
                let xs = xs_floats_for(mt, t);
                assert!(xs >= 256 * 32, "{t} threads, mt {mt}: xs {xs}");
                // MoE down stages one row per routed pair: top_k <= 12 at 32 columns.
                assert!(stage_floats(mt) >= mt * 12 * 32);
            }
        }
        // The default keeps 4 tokens x 4096 resident at the bench plan's 16 tokens.
        assert_eq!(xs_floats_for(16, THREADS), XS_TARGET);
        assert_eq!(smem_bytes(16), smem_bytes_for(16, threads()));
    }

    #[test]
    fn router_splits_cover_k_in_ring_steps() {
        assert_eq!(router_splits(4096), (512, 8));
        assert_eq!(router_splits(2048), (256, 8));
        // The tiny models' hidden size still splits (the GPU checks on tiny plans run the split path).
        assert_eq!(router_splits(64), (32, 2));
        assert_eq!(router_splits(100), (100, 1));
        for k in (32..9000).step_by(32) {
            let (w, n) = router_splits(k);
            assert!(
                w % 32 == 0 && w * n >= k && w * (n - 1) < k && (n <= 8 || w == 512),
                "{k}: {w} x {n}"
            );
        }
    }

    /// The megakernel's MXFP4 device layout (`FP4_POS`, written by `mimo_fp4_repack`) and its decode
    /// (`fp4_pairs`): every E2M1 code of a word, repacked by the table in the source and decoded by the source's
    /// mask / shift / multiply expressions, is the f16 of its OCP value times 2^-14, in pair order (element q in
    /// the low half of pair q, element q + 4 in the high half); and the scale folds the 2^14 back in.
    #[test]
    fn fp4_device_layout_decodes_every_code_exactly() {
        use rand::{Rng, SeedableRng};
        let src = MEGAKERNEL_CU;
        for expr in [
            "p[0] = w & FP4_PAIR_MASK;",
            "p[1] = (w << 8) & FP4_PAIR_MASK;",
            "p[2] = ((w & 0x00710071u) * 0x240u) & FP4_PAIR_MASK;",
            "(unsigned long long)(w & 0x71007100u) * 0x24000u;",
            "p[3] = ((unsigned int)t | (unsigned int)(t >> 32)) & FP4_PAIR_MASK;",
            "#define FP4_PAIR_MASK 0x8E008E00u",
            "return __uint_as_float(b * 0x800000u + 0x7000000u);",
        ] {
            assert!(src.contains(expr), "megakernel.cu no longer has `{expr}`");
        }
        // The position table: 8 entries "m | e0 << 5 | e1 << 10 | s << 15".
        let start = src
            .find("__constant__ unsigned int FP4_POS[8] = {")
            .expect("FP4_POS table");
        let body = &src[start..start + src[start..].find("};").unwrap()];
        let body = &body[body.find('{').unwrap() + 1..];
        let pos: Vec<[u32; 4]> = body
            .split(',')
            .map(|e| {
                let v: Vec<u32> = e
                    .split('|')
                    .map(|t| t.trim().split("u").next().unwrap().trim().parse().unwrap())
                    .collect();
                [v[0], v[1], v[2], v[3]]
            })
            .collect();
        assert_eq!(pos.len(), 8);
        let mut all: Vec<u32> = pos.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(
            all,
            (0..32).collect::<Vec<_>>(),
            "FP4_POS is a permutation of the 32 bits"
        );
        let repack = |w: u32| -> u32 {
            let mut r = 0u32;
            for (e, p) in pos.iter().enumerate() {
                for (b, &bit) in p.iter().enumerate() {
                    r |= ((w >> (4 * e + b)) & 1) << bit;
                }
            }
            r
        };
        let decode = |w: u32| -> [u32; 4] {
            let m = 0x8E00_8E00u32;
            let t = (w & 0x7100_7100) as u64 * 0x24000;
            [
                w & m,
                (w << 8) & m,
                ((w & 0x0071_0071).wrapping_mul(0x240)) & m,
                ((t as u32) | ((t >> 32) as u32)) & m,
            ]
        };
        let e2m1 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..20_000 {
            let w: u32 = rng.random();
            let p = decode(repack(w));
            for (q, &pair) in p.iter().enumerate() {
                for (half, e) in [(0, q), (1, q + 4)] {
                    let code = (w >> (4 * e)) & 15;
                    let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
                    let want = sign * e2m1[(code & 7) as usize] * 2f32.powi(-14);
                    let got = half::f16::from_bits((pair >> (16 * half)) as u16).to_f32();
                    assert_eq!(got, want, "word {w:#010x}, element {e}");
                }
            }
        }
        // Scale: 2^(b - 127) * 2^14 as float bits (b + 14) << 23, for every byte the repack accepts.
        for b in 0u32..=240 {
            let v = f32::from_bits(b.wrapping_mul(0x80_0000).wrapping_add(0x700_0000));
            assert_eq!(v, 2f32.powi(b as i32 - 113), "scale byte {b}");
        }
    }

    #[test]
    fn rope_split_rows_cover_whole_pairs() {
        // MiMo-V2-Flash: head_dim 192, 64 rotary dims -> 32-row tiles (2 rotary + 4 plain per head).
        assert_eq!(rope_split_rows(192, 64), Some(32));
        // Full rotary 128-dim heads; 16-dim heads of the tiny dense model.
        assert_eq!(rope_split_rows(128, 128), Some(32));
        assert_eq!(rope_split_rows(16, 16), Some(16));
        // Five pairs (the tiny MoE: 32-dim heads, 10 rotary dims) cannot split: head-aligned tiles.
        assert_eq!(rope_split_rows(32, 10), None);
        assert_eq!(rope_split_rows(64, 24), Some(8));
        assert_eq!(rope_split_rows(60, 24), None);
    }

    #[test]
    fn dinstr_is_256_bytes_and_source_agrees() {
        assert_eq!(std::mem::size_of::<DInstr>(), 256);
        assert!(MEGAKERNEL_CU.contains("static_assert(sizeof(DInstr) == 256"));
        // The CUDA enum values match the Rust op codes.
        assert!(
            MEGAKERNEL_CU.contains("OP_MOE_DOWN = 8") && MEGAKERNEL_CU.contains("OP_ARGMAX = 12")
        );
    }
}
