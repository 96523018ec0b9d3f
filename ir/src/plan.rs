//! The plan: the flat instruction stream a runtime (CPU interpreter or GPU megakernel) executes, its buffer
//! layout, the weight table, and the on-disk container with integrity checks.
//!
//! On disk a plan is a directory:
//! - `plan.bin`: a 64-byte header (magic, format version, lengths and xxh3-64 checksums of the body and of
//!   `weights.bin`) followed by the bincode-encoded [`Plan`];
//! - `weights.bin`: every weight packed at a 256-byte-aligned offset, memory-mappable;
//! - `megakernel.cu` (and `megakernel.cubin` where nvcc was present): the generated CUDA megakernel.

use crate::graph::{AttnSpec, DType, Epilogue, KvKind, RopeSpec, RouterSpec, WeightClass};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"MIMOPLAN";
/// 2: `Plan::draft` and the DFlash instructions (`LoadInput`, `HeadRmsNorm`, `BlockAttention`).
/// 3: RMSNorm prologues on `Router`, `Moe` and `LmHead` (`norm`), a residual input on `Moe`.
pub const FORMAT_VERSION: u32 = 3;
pub const HEADER_LEN: usize = 64;
pub const WEIGHT_ALIGN: u64 = 256;
pub const PLAN_FILE: &str = "plan.bin";
pub const WEIGHTS_FILE: &str = "weights.bin";

pub type BufId = u32;
pub type WeightId = u32;

/// Facts about the model a runtime needs besides the instructions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub arch: String,
    pub vocab: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub max_position: usize,
}

/// An activation buffer: `max_tokens` rows of `width` f32 at `offset` floats into the arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferDesc {
    pub name: String,
    pub width: usize,
    pub offset: usize,
}

/// A packed weight. For MXFP4, `nbytes` of E2M1 codes (two per byte, low nibble first, rows contiguous) are
/// followed at `scale_offset` by one E8M0 byte per 32 elements; for F8E4M3, the e4m3 bytes are followed by f32
/// `scale_inv` for each 128x128 block (row-major over blocks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightDesc {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub class: WeightClass,
    pub offset: u64,
    pub nbytes: u64,
    pub scale_offset: u64,
    pub scale_nbytes: u64,
}

impl WeightDesc {
    pub fn elems(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn total_bytes(&self) -> u64 {
        self.nbytes + self.scale_nbytes
    }
}

/// One layer's KV cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvDesc {
    pub layer: usize,
    pub heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// Sliding window: the cache keeps `window + max_tokens` slots as a ring.
    pub window: Option<usize>,
}

/// One instruction. Buffers hold `T` valid rows (T = tokens of this forward, at most `Plan::max_tokens`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Instr {
    /// out[t] = table[tokens[t]].
    Embed {
        table: WeightId,
        out: BufId,
    },
    RmsNorm {
        x: BufId,
        w: WeightId,
        out: BufId,
        eps: f32,
    },
    /// out = epilogue(norm?(x) W^T + bias); see [`crate::graph::Op::MatMul`].
    MatMul {
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        norm: Option<(WeightId, f32)>,
        residual: Option<BufId>,
        epilogue: Vec<Epilogue>,
        out: BufId,
    },
    Rope {
        x: BufId,
        out: BufId,
        spec: RopeSpec,
    },
    KvWrite {
        x: BufId,
        layer: usize,
        kind: KvKind,
    },
    Attention {
        q: BufId,
        sinks: Option<WeightId>,
        out: BufId,
        spec: AttnSpec,
    },
    /// Routing buffers hold, per token, `top_k` expert indices (as f32) then `top_k` weights. With `norm`, the
    /// router reads `x / rms(x) * norm_w` (an RMSNorm prologue, as [`Instr::MatMul`]'s).
    Router {
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        norm: Option<(WeightId, f32)>,
        out: BufId,
        spec: RouterSpec,
    },
    /// out = residual? + sum_k w_k * down_e(swiglu(gate_up_e norm?(x))); see [`crate::graph::Op::MoeExperts`].
    Moe {
        x: BufId,
        routing: BufId,
        gate_up: WeightId,
        down: WeightId,
        norm: Option<(WeightId, f32)>,
        residual: Option<BufId>,
        out: BufId,
        top_k: usize,
        inter: usize,
    },
    SwiGlu {
        x: BufId,
        out: BufId,
    },
    Scale {
        x: BufId,
        out: BufId,
        factor: f32,
    },
    Add {
        a: BufId,
        b: BufId,
        out: BufId,
    },
    /// out = norm?(x) W^T (logits).
    LmHead {
        x: BufId,
        w: WeightId,
        norm: Option<(WeightId, f32)>,
        out: BufId,
    },
    /// out[t] = row t of the runtime input `name` (e.g. the DFlash draft's `hidden_in` target features).
    LoadInput {
        name: String,
        out: BufId,
    },
    /// Per-head RMSNorm: every `head_dim` group of x's row normalized with the `[head_dim]` weight.
    HeadRmsNorm {
        x: BufId,
        w: WeightId,
        out: BufId,
        eps: f32,
        head_dim: usize,
    },
    /// DFlash block attention (see [`crate::graph::Op::BlockAttention`]): the forward's T tokens are one block;
    /// each query sees the cached context window before the block and the whole block, bidirectionally.
    BlockAttention {
        q: BufId,
        out: BufId,
        spec: AttnSpec,
    },
}

impl Instr {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Instr::Embed { .. } => "embed",
            Instr::RmsNorm { .. } => "rmsnorm",
            Instr::MatMul { .. } => "matmul",
            Instr::Rope { .. } => "rope",
            Instr::KvWrite { .. } => "kv_write",
            Instr::Attention { .. } => "attention",
            Instr::Router { .. } => "router",
            Instr::Moe { .. } => "moe",
            Instr::SwiGlu { .. } => "swiglu",
            Instr::Scale { .. } => "scale",
            Instr::Add { .. } => "add",
            Instr::LmHead { .. } => "lm_head",
            Instr::LoadInput { .. } => "load_input",
            Instr::HeadRmsNorm { .. } => "head_rmsnorm",
            Instr::BlockAttention { .. } => "block_attention",
        }
    }

    /// Rewrite every buffer and weight id (used when programs lowered separately are merged into one plan).
    pub fn map_ids(&mut self, fb: impl Fn(BufId) -> BufId, fw: impl Fn(WeightId) -> WeightId) {
        match self {
            Instr::Embed { table, out } => {
                *table = fw(*table);
                *out = fb(*out);
            }
            Instr::RmsNorm { x, w, out, .. } | Instr::HeadRmsNorm { x, w, out, .. } => {
                *x = fb(*x);
                *w = fw(*w);
                *out = fb(*out);
            }
            Instr::MatMul {
                x,
                w,
                bias,
                norm,
                residual,
                out,
                ..
            } => {
                *x = fb(*x);
                *w = fw(*w);
                *bias = bias.map(&fw);
                *norm = norm.map(|(n, e)| (fw(n), e));
                *residual = residual.map(&fb);
                *out = fb(*out);
            }
            Instr::Rope { x, out, .. } | Instr::SwiGlu { x, out } | Instr::Scale { x, out, .. } => {
                *x = fb(*x);
                *out = fb(*out);
            }
            Instr::KvWrite { x, .. } => *x = fb(*x),
            Instr::Attention { q, sinks, out, .. } => {
                *q = fb(*q);
                *sinks = sinks.map(&fw);
                *out = fb(*out);
            }
            Instr::Router {
                x,
                w,
                bias,
                norm,
                out,
                ..
            } => {
                *x = fb(*x);
                *w = fw(*w);
                *bias = bias.map(&fw);
                *norm = norm.map(|(n, e)| (fw(n), e));
                *out = fb(*out);
            }
            Instr::Moe {
                x,
                routing,
                gate_up,
                down,
                norm,
                residual,
                out,
                ..
            } => {
                *x = fb(*x);
                *routing = fb(*routing);
                *gate_up = fw(*gate_up);
                *down = fw(*down);
                *norm = norm.map(|(n, e)| (fw(n), e));
                *residual = residual.map(&fb);
                *out = fb(*out);
            }
            Instr::Add { a, b, out } => {
                *a = fb(*a);
                *b = fb(*b);
                *out = fb(*out);
            }
            Instr::LmHead { x, w, norm, out } => {
                *x = fb(*x);
                *w = fw(*w);
                *norm = norm.map(|(n, e)| (fw(n), e));
                *out = fb(*out);
            }
            Instr::LoadInput { out, .. } => *out = fb(*out),
            Instr::BlockAttention { q, out, .. } => {
                *q = fb(*q);
                *out = fb(*out);
            }
        }
    }
}

/// An entry point: a straight-line instruction stream and its named outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub instrs: Vec<Instr>,
    /// `logits` and any captured hidden states, by name.
    pub outputs: Vec<(String, BufId)>,
}

impl Program {
    pub fn output(&self, name: &str) -> Option<BufId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| *b)
    }
}

/// The DFlash draft compiled into the plan (programs `draft_ctx` and `draft_block`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DraftInfo {
    /// Block size the draft was trained with (`block_size`); the runtime's default is min(8, this, max_tokens).
    pub block_size: usize,
    /// Token id that fills the not-yet-known positions of a block.
    pub mask_token: u32,
    /// Target layers whose output hidden states (target outputs `hidden.{i}`) the draft reads, concatenated in
    /// this order into the `hidden_in` input of `draft_ctx`.
    pub target_layers: Vec<usize>,
    /// Sliding window of the draft's attention (context positions kept before the block).
    pub window: usize,
    /// KV-cache layer ids of the draft layers (numbered after the target's layers).
    pub kv_layers: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub model: ModelInfo,
    /// Most tokens one forward processes (verify block / prefill chunk).
    pub max_tokens: usize,
    /// Arena size in f32 elements.
    pub arena_len: usize,
    pub buffers: Vec<BufferDesc>,
    pub weights: Vec<WeightDesc>,
    pub kv: Vec<KvDesc>,
    pub programs: Vec<Program>,
    /// Passes that ran, in order.
    pub passes: Vec<String>,
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub weights_len: u64,
    /// The DFlash draft, when one was compiled in.
    pub draft: Option<DraftInfo>,
}

impl Plan {
    pub fn program(&self, name: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a mimo plan (bad magic); was it written by `mimoc compile`?")]
    BadMagic(String),
    #[error("{path}: plan format version {found}, this runtime reads version {FORMAT_VERSION}; recompile the plan")]
    Version { path: String, found: u32 },
    #[error("{path}: truncated: header says {expected} bytes of plan, file has {found}")]
    Truncated {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("{path}: checksum mismatch (file was modified or corrupted): expected {expected:016x}, got {found:016x}")]
    Checksum {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("{path}: cannot decode plan: {msg}")]
    Decode { path: String, msg: String },
    #[error("{path}: size {found} bytes, plan expects {expected}")]
    WeightsSize {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("plan is inconsistent: {0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> PlanError + '_ {
    move |source| PlanError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Header of `plan.bin`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub plan_len: u64,
    pub plan_hash: u64,
    pub weights_len: u64,
    pub weights_hash: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[16..24].copy_from_slice(&self.plan_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.plan_hash.to_le_bytes());
        h[32..40].copy_from_slice(&self.weights_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.weights_hash.to_le_bytes());
        h
    }
    pub fn decode(b: &[u8], path: &str) -> Result<Header, PlanError> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(PlanError::BadMagic(path.into()));
        }
        let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(PlanError::Version {
                path: path.into(),
                found: version,
            });
        }
        Ok(Header {
            version,
            plan_len: u64at(16),
            plan_hash: u64at(24),
            weights_len: u64at(32),
            weights_hash: u64at(40),
        })
    }
}

/// Encode `plan` into the bytes of `plan.bin`, given the checksum of the weights file.
pub fn encode_plan(plan: &Plan, weights_hash: u64) -> Vec<u8> {
    let body = bincode::serialize(plan).expect("plan serializes");
    let h = Header {
        version: FORMAT_VERSION,
        plan_len: body.len() as u64,
        plan_hash: xxhash_rust::xxh3::xxh3_64(&body),
        weights_len: plan.weights_len,
        weights_hash,
    };
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Decode and check `plan.bin` bytes. Returns the plan and the header (for checking `weights.bin`).
pub fn decode_plan(bytes: &[u8], path: &str) -> Result<(Plan, Header), PlanError> {
    let h = Header::decode(bytes, path)?;
    let found = (bytes.len() - HEADER_LEN) as u64;
    if found != h.plan_len {
        return Err(PlanError::Truncated {
            path: path.into(),
            expected: h.plan_len,
            found,
        });
    }
    let body = &bytes[HEADER_LEN..];
    let hash = xxhash_rust::xxh3::xxh3_64(body);
    if hash != h.plan_hash {
        return Err(PlanError::Checksum {
            path: path.into(),
            expected: h.plan_hash,
            found: hash,
        });
    }
    let plan: Plan = bincode::options()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(1 << 34)
        .deserialize(body)
        .map_err(|e| PlanError::Decode {
            path: path.into(),
            msg: e.to_string(),
        })?;
    if plan.weights_len != h.weights_len {
        return Err(PlanError::Invalid(format!(
            "header says weights.bin has {} bytes, the plan says {}",
            h.weights_len, plan.weights_len
        )));
    }
    plan.validate()?;
    Ok((plan, h))
}

use bincode::Options as _;

/// Write `plan.bin` atomically (temp file + rename) so that a failed write never leaves a half-written plan.
pub fn write_plan_file(dir: &Path, plan: &Plan, weights_hash: u64) -> Result<(), PlanError> {
    let bytes = encode_plan(plan, weights_hash);
    let path = dir.join(PLAN_FILE);
    let tmp = dir.join(format!("{PLAN_FILE}.tmp"));
    std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

/// Read and check `plan.bin`; check `weights.bin`'s size, and its checksum when `verify_weights`.
pub fn read_plan_dir(
    dir: &Path,
    verify_weights: bool,
) -> Result<(Plan, memmap2_shim::Weights), PlanError> {
    let path = dir.join(PLAN_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let (plan, h) = decode_plan(&bytes, &path.display().to_string())?;
    let wpath = dir.join(WEIGHTS_FILE);
    let weights = memmap2_shim::Weights::open(&wpath).map_err(io_err(&wpath))?;
    let wp = wpath.display().to_string();
    if weights.len() as u64 != h.weights_len {
        return Err(PlanError::WeightsSize {
            path: wp,
            expected: h.weights_len,
            found: weights.len() as u64,
        });
    }
    if verify_weights {
        let hash = xxhash_rust::xxh3::xxh3_64(weights.bytes());
        if hash != h.weights_hash {
            return Err(PlanError::Checksum {
                path: wp,
                expected: h.weights_hash,
                found: hash,
            });
        }
    }
    Ok((plan, weights))
}

/// Read-only memory map of `weights.bin`.
pub mod memmap2_shim {
    use std::path::Path;

    pub struct Weights {
        map: Option<memmap2::Mmap>,
    }

    impl Weights {
        pub fn open(path: &Path) -> std::io::Result<Weights> {
            let f = std::fs::File::open(path)?;
            let len = f.metadata()?.len();
            if len == 0 {
                return Ok(Weights { map: None });
            }
            // SAFETY: the plan directory is treated as immutable while a runtime has it open; the checksum in the
            // header detects files that were modified.
            let map = unsafe { memmap2::Mmap::map(&f)? };
            Ok(Weights { map: Some(map) })
        }
        pub fn bytes(&self) -> &[u8] {
            self.map.as_deref().unwrap_or(&[])
        }
        pub fn len(&self) -> usize {
            self.bytes().len()
        }
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }
}

/// Largest layer index a KV-cache entry may name: the runtime allocates one slot per layer up to the largest.
const MAX_LAYERS: usize = 1 << 16;

/// Bytes of an f32 allocation of `n` elements, if it is one a runtime can make (at most `isize::MAX` bytes).
fn f32_alloc_ok(n: usize) -> bool {
    n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize)
}

fn kv_dim(kv: &KvDesc, kind: KvKind) -> usize {
    match kind {
        KvKind::K => kv.k_dim,
        KvKind::V => kv.v_dim,
    }
}

/// The activation buffer an instruction writes, if any.
pub fn instr_output(ins: &Instr) -> Option<BufId> {
    match ins {
        Instr::KvWrite { .. } => None,
        Instr::LoadInput { out, .. }
        | Instr::HeadRmsNorm { out, .. }
        | Instr::BlockAttention { out, .. } => Some(*out),
        Instr::Embed { out, .. }
        | Instr::RmsNorm { out, .. }
        | Instr::MatMul { out, .. }
        | Instr::Rope { out, .. }
        | Instr::Attention { out, .. }
        | Instr::Router { out, .. }
        | Instr::Moe { out, .. }
        | Instr::SwiGlu { out, .. }
        | Instr::Scale { out, .. }
        | Instr::Add { out, .. }
        | Instr::LmHead { out, .. } => Some(*out),
    }
}

impl Plan {
    /// Structural checks so that a runtime never indexes out of bounds (or panics) on a well-formed-but-wrong
    /// plan: every size computation fits, every buffer and weight lies inside the arena / `weights.bin`, and the
    /// shapes of each instruction's operands agree with what the CPU interpreter and kernels index.
    pub fn validate(&self) -> Result<(), PlanError> {
        self.check_globals()?;
        for b in &self.buffers {
            self.check_buffer(b)?;
        }
        for w in &self.weights {
            self.check_weight(w)?;
        }
        self.check_kv()?;
        self.check_draft()?;
        for p in &self.programs {
            for (i, ins) in p.instrs.iter().enumerate() {
                InstrCheck {
                    plan: self,
                    prog: p,
                    i,
                    ins,
                }
                .check()?;
            }
            self.check_outputs(p)?;
        }
        Ok(())
    }

    fn check_globals(&self) -> Result<(), PlanError> {
        if self.max_tokens == 0 {
            return Err(invalid(
                "max_tokens is 0; a forward takes at least one token",
            ));
        }
        if self.model.vocab == 0 {
            return Err(invalid("model.vocab is 0"));
        }
        if !f32_alloc_ok(self.arena_len) {
            return Err(invalid(format!(
                "arena of {} floats is too large to allocate",
                self.arena_len
            )));
        }
        Ok(())
    }

    /// One past the last float of buffer `b` (`offset + width * max_tokens`), `None` on overflow.
    fn buffer_end(&self, b: &BufferDesc) -> Option<usize> {
        b.width.checked_mul(self.max_tokens)?.checked_add(b.offset)
    }

    fn check_buffer(&self, b: &BufferDesc) -> Result<(), PlanError> {
        let Some(end) = self.buffer_end(b) else {
            return Err(invalid(format!(
                "buffer {}: offset {} + width {} x max_tokens {} overflows",
                b.name, b.offset, b.width, self.max_tokens
            )));
        };
        if end > self.arena_len {
            return Err(invalid(format!(
                "buffer {} (offset {}, width {}, max_tokens {}) exceeds the arena of {} floats",
                b.name, b.offset, b.width, self.max_tokens, self.arena_len
            )));
        }
        Ok(())
    }

    fn check_weight(&self, w: &WeightDesc) -> Result<(), PlanError> {
        if w.dims.is_empty() || w.dims.contains(&0) {
            return Err(invalid(format!(
                "weight {}: dims {:?} must be non-empty with no zero dim",
                w.name, w.dims
            )));
        }
        for (what, off, len) in [
            ("data", w.offset, w.nbytes),
            ("scales", w.scale_offset, w.scale_nbytes),
        ] {
            match off.checked_add(len) {
                None => {
                    return Err(invalid(format!(
                        "weight {}: {what} offset {off} + {len} bytes overflows",
                        w.name
                    )))
                }
                Some(end) if end > self.weights_len => {
                    return Err(invalid(format!(
                        "weight {}: {what} at {off}..{end} lies outside weights.bin ({} bytes)",
                        w.name, self.weights_len
                    )))
                }
                Some(_) => {}
            }
        }
        if expected_bytes(w.dtype, &w.dims) != Some((w.nbytes, w.scale_nbytes)) {
            return Err(invalid(format!(
                "weight {}: {} + {} bytes for {} {:?}",
                w.name,
                w.nbytes,
                w.scale_nbytes,
                w.dtype.name(),
                w.dims
            )));
        }
        Ok(())
    }

    fn check_kv(&self) -> Result<(), PlanError> {
        for (j, k) in self.kv.iter().enumerate() {
            let l = k.layer;
            if k.heads == 0 || k.k_dim == 0 || k.v_dim == 0 {
                return Err(invalid(format!(
                    "KV cache of layer {l}: heads {}, k_dim {}, v_dim {} must all be > 0",
                    k.heads, k.k_dim, k.v_dim
                )));
            }
            let draft_layers = self
                .draft
                .as_ref()
                .is_some_and(|d| d.kv_layers.contains(&l));
            if l >= self.model.n_layers.min(MAX_LAYERS) && !draft_layers {
                return Err(invalid(format!(
                    "KV cache of layer {l}: the model has {} layers",
                    self.model.n_layers
                )));
            }
            if self.kv[..j].iter().any(|o| o.layer == l) {
                return Err(invalid(format!("two KV caches for layer {l}")));
            }
            for d in [k.k_dim, k.v_dim] {
                if !k.heads.checked_mul(d).is_some_and(f32_alloc_ok) {
                    return Err(invalid(format!(
                        "KV cache of layer {l}: {} heads x {d} overflows",
                        k.heads
                    )));
                }
            }
            if let Some(w) = k.window {
                if w == 0 || w.checked_add(self.max_tokens).is_none() {
                    return Err(invalid(format!(
                        "KV cache of layer {l}: bad sliding window {w}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_outputs(&self, p: &Program) -> Result<(), PlanError> {
        for (name, b) in &p.outputs {
            let Some(d) = self.buffers.get(*b as usize) else {
                return Err(invalid(format!(
                    "program {} has an output {name} outside the buffers",
                    p.name
                )));
            };
            if name == "logits" && d.width != self.model.vocab {
                return Err(invalid(format!(
                    "program {}: logits buffer {} has width {}, model.vocab is {}",
                    p.name, d.name, d.width, self.model.vocab
                )));
            }
        }
        // `draft_ctx` only writes the draft's KV cache; every other program produces logits.
        if p.output("logits").is_none() && p.name != "draft_ctx" {
            return Err(invalid(format!("program {} has no logits output", p.name)));
        }
        Ok(())
    }

    fn check_draft(&self) -> Result<(), PlanError> {
        let Some(d) = &self.draft else {
            return Ok(());
        };
        if d.block_size == 0 || d.window == 0 || d.window.checked_add(self.max_tokens).is_none() {
            return Err(invalid(format!(
                "draft: block_size {} and window {} must be > 0",
                d.block_size, d.window
            )));
        }
        if d.mask_token as usize >= self.model.vocab {
            return Err(invalid(format!(
                "draft: mask token {} is outside the vocabulary ({})",
                d.mask_token, self.model.vocab
            )));
        }
        if d.target_layers.is_empty() {
            return Err(invalid("draft: no target layers"));
        }
        let target = self
            .program("target")
            .ok_or_else(|| invalid("draft: plan has no target program"))?;
        for l in &d.target_layers {
            if target.output(&format!("hidden.{l}")).is_none() {
                return Err(invalid(format!(
                    "draft reads target layer {l}, but the target program has no output hidden.{l}"
                )));
            }
        }
        for name in ["draft_ctx", "draft_block"] {
            if self.program(name).is_none() {
                return Err(invalid(format!("draft: plan has no program {name}")));
            }
        }
        for l in &d.kv_layers {
            if *l >= MAX_LAYERS || !self.kv.iter().any(|k| k.layer == *l) {
                return Err(invalid(format!("draft: KV layer {l} has no cache")));
            }
        }
        Ok(())
    }
}

fn invalid(m: impl Into<String>) -> PlanError {
    PlanError::Invalid(m.into())
}

/// Shape checks of one instruction; every error names the program, the instruction index and its mnemonic.
struct InstrCheck<'a> {
    plan: &'a Plan,
    prog: &'a Program,
    i: usize,
    ins: &'a Instr,
}

type Check = Result<(), PlanError>;

impl<'a> InstrCheck<'a> {
    fn err(&self, what: impl std::fmt::Display) -> PlanError {
        PlanError::Invalid(format!(
            "program {} instruction {} ({}): {what}",
            self.prog.name,
            self.i,
            self.ins.mnemonic()
        ))
    }

    fn ensure(&self, ok: bool, what: impl FnOnce() -> String) -> Check {
        if ok {
            Ok(())
        } else {
            Err(self.err(what()))
        }
    }

    fn buf(&self, id: BufId) -> Result<&'a BufferDesc, PlanError> {
        self.plan
            .buffers
            .get(id as usize)
            .ok_or_else(|| self.err(format!("refers to a missing buffer {id}")))
    }

    fn width(&self, id: BufId) -> Result<usize, PlanError> {
        Ok(self.buf(id)?.width)
    }

    fn weight(&self, id: WeightId) -> Result<&'a WeightDesc, PlanError> {
        self.plan
            .weights
            .get(id as usize)
            .ok_or_else(|| self.err(format!("refers to a missing weight {id}")))
    }

    /// The dims of weight `id`, which must have `N` of them.
    fn dims<const N: usize>(&self, role: &str, id: WeightId) -> Result<[usize; N], PlanError> {
        let w = self.weight(id)?;
        <[usize; N]>::try_from(&w.dims[..]).map_err(|_| {
            self.err(format!(
                "{role} weight {} has dims {:?}, expected {N}-D",
                w.name, w.dims
            ))
        })
    }

    fn expect_dims(&self, role: &str, id: WeightId, want: &[usize], why: &str) -> Check {
        let w = self.weight(id)?;
        self.ensure(w.dims == want, || {
            format!(
                "{role} weight {} has dims {:?}, expected {want:?} ({why})",
                w.name, w.dims
            )
        })
    }

    fn expect_width(&self, role: &str, id: BufId, want: usize, why: &str) -> Check {
        let b = self.buf(id)?;
        self.ensure(b.width == want, || {
            format!(
                "{role} buffer {} has width {}, expected {want} ({why})",
                b.name, b.width
            )
        })
    }

    fn kv(&self, layer: usize) -> Result<&'a KvDesc, PlanError> {
        self.plan
            .kv
            .iter()
            .find(|k| k.layer == layer)
            .ok_or_else(|| {
                self.err(format!(
                    "uses the KV cache of layer {layer}, which has none"
                ))
            })
    }

    fn mul(&self, a: usize, b: usize, what: &str) -> Result<usize, PlanError> {
        a.checked_mul(b)
            .ok_or_else(|| self.err(format!("{what}: {a} x {b} overflows")))
    }

    fn check(&self) -> Check {
        match self.ins {
            Instr::Embed { table, out } => self.embed(*table, *out),
            Instr::RmsNorm { x, w, out, .. } => self.rmsnorm(*x, *w, *out),
            Instr::MatMul {
                x,
                w,
                bias,
                norm,
                residual,
                epilogue,
                out,
            } => self.matmul(*x, *w, *bias, norm.map(|n| n.0), *residual, epilogue, *out),
            Instr::Rope { x, out, spec } => self.rope(*x, *out, spec),
            Instr::KvWrite { x, layer, kind } => self.kv_write(*x, *layer, *kind),
            Instr::Attention {
                q,
                sinks,
                out,
                spec,
            } => self.attention(*q, *sinks, *out, spec),
            Instr::Router {
                x,
                w,
                bias,
                norm,
                out,
                spec,
            } => {
                self.router(*x, *w, *bias, *out, spec)?;
                self.norm_prologue(*norm, *x)
            }
            Instr::Moe {
                x,
                routing,
                gate_up,
                down,
                norm,
                residual,
                out,
                top_k,
                inter,
            } => {
                self.moe(*x, *routing, *gate_up, *down, *out, *top_k, *inter)?;
                self.norm_prologue(*norm, *x)?;
                if let Some(r) = residual {
                    let h = self.width(*x)?;
                    self.expect_width("residual", *r, h, "the x width")?;
                }
                Ok(())
            }
            Instr::SwiGlu { x, out } => self.swiglu(*x, *out),
            Instr::Scale { x, out, .. } => {
                let xw = self.width(*x)?;
                self.expect_width("out", *out, xw, "the x width")
            }
            Instr::Add { a, b, out } => {
                let aw = self.width(*a)?;
                self.expect_width("b", *b, aw, "the a width")?;
                self.expect_width("out", *out, aw, "the a width")
            }
            Instr::LmHead { x, w, norm, out } => {
                let [v, k] = self.dims::<2>("lm_head", *w)?;
                self.expect_width("x", *x, k, "the weight's columns")?;
                self.expect_width("out", *out, v, "the weight's rows")?;
                self.norm_prologue(*norm, *x)
            }
            Instr::LoadInput { name, out } => {
                self.ensure(name == "hidden_in", || {
                    format!("unknown runtime input {name:?} (known: hidden_in)")
                })?;
                let want = self
                    .plan
                    .draft
                    .as_ref()
                    .map(|d| d.target_layers.len() * self.plan.model.hidden);
                match want {
                    Some(w) => self.expect_width("out", *out, w, "target layers x hidden"),
                    None => Err(self.err("hidden_in needs a draft in the plan")),
                }
            }
            Instr::HeadRmsNorm {
                x,
                w,
                out,
                head_dim,
                ..
            } => {
                let xw = self.width(*x)?;
                self.ensure(*head_dim > 0 && xw.is_multiple_of(*head_dim), || {
                    format!("head_dim {head_dim} does not divide the x width {xw}")
                })?;
                self.expect_dims("norm", *w, &[*head_dim], "head_dim")?;
                self.expect_width("out", *out, xw, "the x width")
            }
            Instr::BlockAttention { q, out, spec } => {
                self.ensure(!spec.sinks, || "block attention has no sinks".into())?;
                self.attention(*q, None, *out, spec)
            }
        }
    }

    fn embed(&self, table: WeightId, out: BufId) -> Check {
        let [rows, cols] = self.dims::<2>("table", table)?;
        let vocab = self.plan.model.vocab;
        self.ensure(rows >= vocab, || {
            format!(
                "embedding table {} has {rows} rows, fewer than model.vocab {vocab}",
                self.plan.weights[table as usize].name
            )
        })?;
        self.expect_width("out", out, cols, "the table's width")
    }

    fn rmsnorm(&self, x: BufId, w: WeightId, out: BufId) -> Check {
        let xw = self.width(x)?;
        self.expect_dims("norm", w, &[xw], "the x width")?;
        self.expect_width("out", out, xw, "the x width")
    }

    /// An RMSNorm prologue's weight must have one element per column of x.
    fn norm_prologue(&self, norm: Option<(WeightId, f32)>, x: BufId) -> Check {
        match norm {
            Some((g, _)) => {
                let xw = self.width(x)?;
                self.expect_dims("norm", g, &[xw], "the x width")
            }
            None => Ok(()),
        }
    }

    fn rope_spec(&self, spec: &RopeSpec, width: usize, at: &str) -> Check {
        let (hd, rd) = (spec.head_dim, spec.rotary_dim);
        self.ensure(hd > 0 && width.is_multiple_of(hd), || {
            format!("{at}: rope head_dim {hd} does not divide the width {width}")
        })?;
        self.ensure(rd % 2 == 0 && rd <= hd, || {
            format!("{at}: rope rotary_dim {rd} must be even and at most head_dim {hd}")
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        norm: Option<WeightId>,
        residual: Option<BufId>,
        epilogue: &[Epilogue],
        out: BufId,
    ) -> Check {
        let [n, k] = self.dims::<2>("matmul", w)?;
        self.expect_width("x", x, k, "the weight's columns k")?;
        if let Some(b) = bias {
            self.expect_dims("bias", b, &[n], "the weight's rows n")?;
        }
        if let Some(g) = norm {
            self.expect_dims("norm", g, &[k], "the x width k")?;
        }
        let adds = epilogue.contains(&Epilogue::ResidualAdd);
        self.ensure(adds == residual.is_some(), || {
            format!(
                "has a residual input: {}, but a residual-add epilogue: {adds}",
                residual.is_some()
            )
        })?;
        // The row width as it flows through the epilogue.
        let mut width = n;
        for (s, e) in epilogue.iter().enumerate() {
            let at = format!("epilogue {s}");
            match e {
                Epilogue::Scale(_) => {}
                Epilogue::Rope(spec) => self.rope_spec(spec, width, &at)?,
                Epilogue::KvWrite {
                    layer,
                    kind,
                    heads,
                    head_dim,
                } => {
                    let kv = self.kv(*layer)?;
                    let hw = self.mul(*heads, *head_dim, &at)?;
                    self.ensure(hw == width, || {
                        format!("{at}: kv_write of {heads} x {head_dim} on rows of width {width}")
                    })?;
                    let d = kv_dim(kv, *kind);
                    self.ensure(*heads == kv.heads && *head_dim == d, || {
                        format!(
                            "{at}: kv_write {kind:?} of {heads} x {head_dim}, but the KV cache of layer {layer} \
                             holds {} x {d}",
                            kv.heads
                        )
                    })?;
                }
                Epilogue::SwiGlu => {
                    self.ensure(width % 2 == 0, || {
                        format!("{at}: swiglu on odd width {width}")
                    })?;
                    width /= 2;
                }
                Epilogue::ResidualAdd => {
                    let r = residual.expect("checked above");
                    self.expect_width("residual", r, width, &format!("the width at {at}"))?;
                }
            }
        }
        self.expect_width("out", out, width, "the weight's rows n after the epilogue")
    }

    fn rope(&self, x: BufId, out: BufId, spec: &RopeSpec) -> Check {
        let xw = self.width(x)?;
        self.expect_width("out", out, xw, "the x width")?;
        self.rope_spec(spec, xw, "spec")
    }

    fn kv_write(&self, x: BufId, layer: usize, kind: KvKind) -> Check {
        let kv = self.kv(layer)?;
        // Cannot overflow: check_kv checked heads x dim.
        let want = kv.heads * kv_dim(kv, kind);
        self.expect_width(
            "x",
            x,
            want,
            &format!("heads x {kind:?} dim of the layer {layer} KV cache"),
        )
    }

    fn attention(&self, q: BufId, sinks: Option<WeightId>, out: BufId, s: &AttnSpec) -> Check {
        self.ensure(
            s.n_heads > 0 && s.n_kv_heads > 0 && s.n_heads.is_multiple_of(s.n_kv_heads),
            || {
                format!(
                    "n_kv_heads {} must be > 0 and divide n_heads {} (> 0)",
                    s.n_kv_heads, s.n_heads
                )
            },
        )?;
        let qw = self.mul(s.n_heads, s.head_dim, "n_heads x head_dim")?;
        self.expect_width("q", q, qw, "n_heads x head_dim")?;
        let ow = self.mul(s.n_heads, s.v_head_dim, "n_heads x v_head_dim")?;
        self.expect_width("out", out, ow, "n_heads x v_head_dim")?;
        let kv = self.kv(s.layer)?;
        self.ensure(
            kv.heads == s.n_kv_heads && kv.k_dim == s.head_dim && kv.v_dim == s.v_head_dim,
            || {
                format!(
                    "reads {} kv heads of k/v dims {}/{}, but the KV cache of layer {} holds {} heads of {}/{}",
                    s.n_kv_heads, s.head_dim, s.v_head_dim, s.layer, kv.heads, kv.k_dim, kv.v_dim
                )
            },
        )?;
        self.ensure(kv.window == s.window, || {
            format!(
                "window {:?}, but the KV cache of layer {} keeps window {:?}",
                s.window, s.layer, kv.window
            )
        })?;
        if let Some(w) = sinks {
            self.expect_dims("sinks", w, &[s.n_heads], "one per head")?;
        }
        Ok(())
    }

    fn router(
        &self,
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        out: BufId,
        s: &RouterSpec,
    ) -> Check {
        let e = s.n_experts;
        let xw = self.width(x)?;
        self.expect_dims("router", w, &[e, xw], "[n_experts, x width]")?;
        if let Some(b) = bias {
            self.expect_dims("bias", b, &[e], "one per expert")?;
        }
        self.ensure(s.top_k >= 1 && s.top_k <= e, || {
            format!("top_k {} is not in 1..={e} (n_experts)", s.top_k)
        })?;
        self.expect_width("out", out, 2 * s.top_k, "2 x top_k")?;
        self.ensure(s.n_group > 0 && e.is_multiple_of(s.n_group), || {
            format!("n_group {} does not divide n_experts {e}", s.n_group)
        })?;
        self.ensure(s.topk_group <= s.n_group, || {
            format!("topk_group {} > n_group {}", s.topk_group, s.n_group)
        })?;
        if s.n_group > 1 {
            // Only the experts of the `topk_group` chosen groups are candidates.
            self.ensure(s.topk_group * (e / s.n_group) >= s.top_k, || {
                format!(
                    "top_k {} exceeds the {} experts of {} of {} groups",
                    s.top_k,
                    s.topk_group * (e / s.n_group),
                    s.topk_group,
                    s.n_group
                )
            })?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        x: BufId,
        routing: BufId,
        gate_up: WeightId,
        down: WeightId,
        out: BufId,
        top_k: usize,
        inter: usize,
    ) -> Check {
        let h = self.width(x)?;
        self.expect_width("out", out, h, "the x width")?;
        let [e, _, _] = self.dims::<3>("gate_up", gate_up)?;
        let two_inter = self.mul(2, inter, "2 x inter")?;
        self.expect_dims(
            "gate_up",
            gate_up,
            &[e, two_inter, h],
            "[E, 2 x inter, x width]",
        )?;
        self.expect_dims("down", down, &[e, h, inter], "[E, x width, inter]")?;
        let rw = self.mul(2, top_k, "2 x top_k")?;
        self.expect_width("routing", routing, rw, "2 x top_k")?;
        self.routing_source(routing, top_k, e)
    }

    /// The routing rows hold expert indices the runtime uses to slice expert weights, so they must come from a
    /// router of this layer's shape earlier in the program, with nothing overwriting them in between.
    fn routing_source(&self, routing: BufId, top_k: usize, n_experts: usize) -> Check {
        let r = self.buf(routing)?;
        let span = |b: &BufferDesc| (b.offset, self.plan.buffer_end(b).unwrap_or(usize::MAX));
        let (lo, hi) = span(r);
        for j in (0..self.i).rev() {
            let prev = &self.prog.instrs[j];
            let Some(wid) = instr_output(prev) else {
                continue;
            };
            if wid == routing {
                return match prev {
                    Instr::Router { spec, .. }
                        if spec.top_k == top_k && spec.n_experts == n_experts =>
                    {
                        Ok(())
                    }
                    Instr::Router { spec, .. } => Err(self.err(format!(
                        "routing buffer {} comes from a router (instruction {j}) of {} experts top-{}, \
                         expected {n_experts} experts top-{top_k}",
                        r.name, spec.n_experts, spec.top_k
                    ))),
                    _ => Err(self.err(format!(
                        "routing buffer {} is written by instruction {j} ({}), not by a router",
                        r.name,
                        prev.mnemonic()
                    ))),
                };
            }
            if let Some(b) = self.plan.buffers.get(wid as usize) {
                let (blo, bhi) = span(b);
                if blo < hi && lo < bhi && blo < bhi && lo < hi {
                    return Err(self.err(format!(
                        "routing buffer {} is overwritten by instruction {j} ({}) before it is read",
                        r.name,
                        prev.mnemonic()
                    )));
                }
            }
        }
        Err(self.err(format!(
            "routing buffer {} is not written by a router earlier in program {}",
            r.name, self.prog.name
        )))
    }

    fn swiglu(&self, x: BufId, out: BufId) -> Check {
        let xw = self.width(x)?;
        self.ensure(xw % 2 == 0, || format!("x width {xw} is odd"))?;
        self.expect_width("out", out, xw / 2, "half the x width")
    }
}

/// Bytes of data and of scales for a weight of this dtype and shape; `None` for dtypes that are not weights,
/// MXFP4 rows that are not whole blocks, or sizes that overflow.
pub fn expected_bytes(dtype: DType, dims: &[usize]) -> Option<(u64, u64)> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let last = *dims.last()?;
    let n64 = u64::try_from(n).ok()?;
    Some(match dtype {
        DType::F32 => (n64.checked_mul(4)?, 0),
        DType::BF16 | DType::F16 => (n64.checked_mul(2)?, 0),
        DType::F8E4M3 => {
            // Blocks of 128x128 over the last two dims; leading dims (experts) multiply.
            let (r, c) = if dims.len() >= 2 {
                (dims[dims.len() - 2], last)
            } else {
                (1, last)
            };
            let lead = n / r.checked_mul(c)?.max(1);
            let blocks = lead
                .checked_mul(r.div_ceil(128))?
                .checked_mul(c.div_ceil(128))?;
            (n64, u64::try_from(blocks).ok()?.checked_mul(4)?)
        }
        DType::MXFP4 => {
            if last % 32 != 0 {
                return None;
            }
            (n64 / 2, n64 / 32)
        }
        DType::I32 | DType::Routing | DType::Cache => return None,
    })
}

/// Buffers and weights an instruction refers to.
pub fn instr_refs(ins: &Instr) -> (Vec<BufId>, Vec<WeightId>) {
    match ins {
        Instr::Embed { table, out } => (vec![*out], vec![*table]),
        Instr::RmsNorm { x, w, out, .. } => (vec![*x, *out], vec![*w]),
        Instr::MatMul {
            x,
            w,
            bias,
            norm,
            residual,
            out,
            ..
        } => {
            let mut b = vec![*x, *out];
            b.extend(residual);
            let mut ws = vec![*w];
            ws.extend(bias);
            ws.extend(norm.map(|n| n.0));
            (b, ws)
        }
        Instr::Rope { x, out, .. } => (vec![*x, *out], vec![]),
        Instr::KvWrite { x, .. } => (vec![*x], vec![]),
        Instr::Attention { q, sinks, out, .. } => (vec![*q, *out], sinks.iter().copied().collect()),
        Instr::Router {
            x,
            w,
            bias,
            norm,
            out,
            ..
        } => {
            let mut ws = vec![*w];
            ws.extend(bias);
            ws.extend(norm.map(|n| n.0));
            (vec![*x, *out], ws)
        }
        Instr::Moe {
            x,
            routing,
            gate_up,
            down,
            norm,
            residual,
            out,
            ..
        } => {
            let mut b = vec![*x, *routing, *out];
            b.extend(residual);
            let mut ws = vec![*gate_up, *down];
            ws.extend(norm.map(|n| n.0));
            (b, ws)
        }
        Instr::SwiGlu { x, out } | Instr::Scale { x, out, .. } => (vec![*x, *out], vec![]),
        Instr::Add { a, b, out } => (vec![*a, *b, *out], vec![]),
        Instr::LmHead { x, w, norm, out } => {
            let mut ws = vec![*w];
            ws.extend(norm.map(|n| n.0));
            (vec![*x, *out], ws)
        }
        Instr::LoadInput { out, .. } => (vec![*out], vec![]),
        Instr::HeadRmsNorm { x, w, out, .. } => (vec![*x, *out], vec![*w]),
        Instr::BlockAttention { q, out, .. } => (vec![*q, *out], vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_weight(name: &str, dims: Vec<usize>, offset: u64) -> WeightDesc {
        let nbytes = 4 * dims.iter().product::<usize>() as u64;
        WeightDesc {
            name: name.into(),
            dtype: DType::F32,
            dims,
            class: WeightClass::Embedding,
            offset,
            nbytes,
            scale_offset: offset + nbytes,
            scale_nbytes: 0,
        }
    }

    fn buffer(name: &str, width: usize, offset: usize) -> BufferDesc {
        BufferDesc {
            name: name.into(),
            width,
            offset,
        }
    }

    /// Embedding (tied with the LM head) of a 4-token vocabulary into width 2; buffer `x`, then `logits`.
    fn tiny_plan() -> Plan {
        Plan {
            model: ModelInfo {
                arch: "test".into(),
                vocab: 4,
                hidden: 2,
                n_layers: 0,
                bos: None,
                eos: vec![1],
                max_position: 8,
            },
            max_tokens: 2,
            arena_len: 12,
            buffers: vec![buffer("x", 2, 0), buffer("logits", 4, 4)],
            weights: vec![f32_weight("e", vec![4, 2], 0)],
            kv: vec![],
            programs: vec![Program {
                name: "target".into(),
                instrs: vec![
                    Instr::Embed { table: 0, out: 0 },
                    Instr::LmHead {
                        x: 0,
                        w: 0,
                        norm: None,
                        out: 1,
                    },
                ],
                outputs: vec![("logits".into(), 1)],
            }],
            passes: vec![],
            tokenizer_json: "{}".into(),
            chat_template: None,
            weights_len: 256,
            draft: None,
        }
    }

    fn invalid_msg(p: &Plan) -> String {
        match p.validate() {
            Err(PlanError::Invalid(m)) => m,
            other => panic!("expected PlanError::Invalid, got {other:?}"),
        }
    }

    /// `tiny_plan` plus a matmul `x -> mm` with weight `w` of `dims` (and the given epilogue / bias).
    fn with_matmul(dims: Vec<usize>, out_width: usize, epilogue: Vec<Epilogue>) -> Plan {
        let mut p = tiny_plan();
        p.weights.push(f32_weight("w", dims, 32));
        p.buffers.push(buffer("mm", out_width, 12));
        p.arena_len = 12 + 2 * out_width;
        p.programs[0].instrs.insert(
            1,
            Instr::MatMul {
                x: 0,
                w: 1,
                bias: None,
                norm: None,
                residual: None,
                epilogue,
                out: 2,
            },
        );
        p
    }

    #[test]
    fn round_trip() {
        let p = tiny_plan();
        let bytes = encode_plan(&p, 42);
        let (q, h) = decode_plan(&bytes, "x").unwrap();
        assert_eq!(p, q);
        assert_eq!(h.weights_hash, 42);
    }

    #[test]
    fn truncated_and_tampered_are_clear_errors() {
        let bytes = encode_plan(&tiny_plan(), 0);
        let e = decode_plan(&bytes[..bytes.len() - 3], "p").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut t = bytes.clone();
        let k = t.len() - 5;
        t[k] ^= 0x40;
        let e = decode_plan(&t, "p").unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let e = decode_plan(&bytes[..10], "p").unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        let mut v = bytes.clone();
        v[8] = 9;
        assert!(matches!(
            decode_plan(&v, "p").unwrap_err(),
            PlanError::Version { found: 9, .. }
        ));
    }

    #[test]
    fn validate_rejects_dangling_refs() {
        let mut p = tiny_plan();
        p.programs[0].instrs.push(Instr::Add { a: 0, b: 7, out: 0 });
        let bytes = encode_plan(&p, 0);
        let e = decode_plan(&bytes, "p").unwrap_err();
        assert!(e.to_string().contains("missing buffer"), "{e}");
    }

    #[test]
    fn tiny_plans_validate() {
        tiny_plan().validate().unwrap();
        with_matmul(vec![6, 2], 6, vec![]).validate().unwrap();
        with_matmul(vec![6, 2], 3, vec![Epilogue::SwiGlu])
            .validate()
            .unwrap();
    }

    #[test]
    fn overflowing_buffer_offset_is_invalid() {
        let mut p = tiny_plan();
        p.buffers[0].offset = usize::MAX - 1;
        let m = invalid_msg(&p);
        assert!(m.contains("buffer x") && m.contains("overflows"), "{m}");
        let mut p = tiny_plan();
        p.buffers[1].width = usize::MAX / 2 + 1;
        let m = invalid_msg(&p);
        assert!(
            m.contains("buffer logits") && m.contains("overflows"),
            "{m}"
        );
        let mut p = tiny_plan();
        p.buffers[1].offset = 5;
        let m = invalid_msg(&p);
        assert!(
            m.contains("buffer logits") && m.contains("exceeds the arena"),
            "{m}"
        );
    }

    #[test]
    fn overflowing_weight_offset_is_invalid() {
        let mut p = tiny_plan();
        p.weights[0].offset = u64::MAX - 8;
        let m = invalid_msg(&p);
        assert!(m.contains("weight e") && m.contains("overflows"), "{m}");
        let mut p = tiny_plan();
        p.weights[0].scale_offset = 250;
        p.weights[0].scale_nbytes = 0;
        p.weights[0].offset = 240;
        let m = invalid_msg(&p);
        assert!(
            m.contains("weight e") && m.contains("outside weights.bin"),
            "{m}"
        );
        let mut p = tiny_plan();
        p.weights[0].dims = vec![usize::MAX, 4];
        let m = invalid_msg(&p);
        assert!(m.contains("weight e"), "{m}");
    }

    #[test]
    fn misshaped_matmul_weight_is_invalid() {
        // k = 3 but x has width 2
        let m = invalid_msg(&with_matmul(vec![6, 3], 6, vec![]));
        assert!(
            m.contains("program target instruction 1 (matmul)")
                && m.contains("buffer x has width 2, expected 3"),
            "{m}"
        );
        // 3-D weight
        let m = invalid_msg(&with_matmul(vec![1, 6, 2], 6, vec![]));
        assert!(m.contains("(matmul)") && m.contains("expected 2-D"), "{m}");
        // out is n, but swiglu halves it
        let m = invalid_msg(&with_matmul(vec![6, 2], 6, vec![Epilogue::SwiGlu]));
        assert!(m.contains("out buffer mm has width 6, expected 3"), "{m}");
        // residual add without a residual input
        let m = invalid_msg(&with_matmul(vec![6, 2], 6, vec![Epilogue::ResidualAdd]));
        assert!(m.contains("residual"), "{m}");
        // a kv-write epilogue into a layer without a cache
        let kvw = Epilogue::KvWrite {
            layer: 0,
            kind: KvKind::K,
            heads: 3,
            head_dim: 2,
        };
        let m = invalid_msg(&with_matmul(vec![6, 2], 6, vec![kvw]));
        assert!(m.contains("KV cache of layer 0"), "{m}");
    }

    #[test]
    fn vocab_and_logits_must_agree() {
        let mut p = tiny_plan();
        p.model.vocab = 5;
        let m = invalid_msg(&p);
        assert!(
            m.contains("instruction 0 (embed)") && m.contains("model.vocab 5"),
            "{m}"
        );
        let mut p = tiny_plan();
        p.programs[0].outputs[0].1 = 0;
        let m = invalid_msg(&p);
        assert!(m.contains("logits buffer x has width 2"), "{m}");
        let mut p = tiny_plan();
        p.max_tokens = 0;
        assert!(invalid_msg(&p).contains("max_tokens"));
    }

    #[test]
    fn router_and_moe_shapes() {
        // x (width 2) -> router (4 experts, top 2) -> r (width 4); moe x, r -> y
        let mut p = tiny_plan();
        p.weights.push(f32_weight("router", vec![4, 2], 32)); // 1
        p.weights.push(f32_weight("gate_up", vec![4, 6, 2], 64)); // 2
        p.weights.push(f32_weight("down", vec![4, 2, 3], 160)); // 3
        p.buffers.push(buffer("r", 4, 12)); // 2
        p.buffers.push(buffer("y", 2, 20)); // 3
        p.arena_len = 24;
        let spec = RouterSpec::sigmoid_top_k(4, 2, false);
        let router = Instr::Router {
            x: 0,
            w: 1,
            bias: None,
            norm: None,
            out: 2,
            spec,
        };
        let moe = Instr::Moe {
            x: 0,
            routing: 2,
            gate_up: 2,
            down: 3,
            norm: None,
            residual: None,
            out: 3,
            top_k: 2,
            inter: 3,
        };
        p.programs[0].instrs.insert(1, router);
        p.programs[0].instrs.insert(2, moe.clone());
        p.validate().unwrap();

        let mut q = p.clone();
        if let Instr::Router { spec, .. } = &mut q.programs[0].instrs[1] {
            spec.top_k = 5;
        }
        let m = invalid_msg(&q);
        assert!(
            m.contains("instruction 1 (router)") && m.contains("top_k 5"),
            "{m}"
        );

        // routing rows that no router wrote would index experts out of bounds
        let mut q = p.clone();
        q.programs[0].instrs.remove(1);
        let m = invalid_msg(&q);
        assert!(
            m.contains("(moe)") && m.contains("not written by a router"),
            "{m}"
        );

        // ... and so would routing rows a later instruction overwrote
        let mut q = p.clone();
        q.programs[0].instrs.insert(
            2,
            Instr::Scale {
                x: 3,
                out: 3,
                factor: 1.0,
            },
        );
        q.buffers[3].offset = 14;
        q.arena_len = 24;
        let m = invalid_msg(&q);
        assert!(m.contains("overwritten by instruction 2 (scale)"), "{m}");

        let mut q = p.clone();
        q.weights[3].dims = vec![4, 3, 2];
        let m = invalid_msg(&q);
        assert!(m.contains("down weight down has dims [4, 3, 2]"), "{m}");

        // Fused forms: RMSNorm prologues on router, moe and LM head, the residual on moe.
        let mut f = p.clone();
        f.weights.push(f32_weight("norm", vec![2], 224)); // 4
        f.weights.push(f32_weight("norm3", vec![3], 240)); // 5
        let set = |f: &mut Plan, nw: WeightId, res: BufId| {
            for ins in f.programs[0].instrs.iter_mut() {
                match ins {
                    Instr::Router { norm, .. } | Instr::LmHead { norm, .. } => {
                        *norm = Some((nw, 1e-5))
                    }
                    Instr::Moe { norm, residual, .. } => {
                        *norm = Some((nw, 1e-5));
                        *residual = Some(res);
                    }
                    _ => {}
                }
            }
        };
        set(&mut f, 4, 0);
        f.validate().unwrap();
        let bytes = encode_plan(&f, 0);
        assert_eq!(decode_plan(&bytes, "p").unwrap().0, f);
        // A norm weight of the wrong width, a missing one, a residual of the wrong width or a missing one.
        let mut q = f.clone();
        set(&mut q, 5, 0);
        let m = invalid_msg(&q);
        assert!(
            m.contains("instruction 1 (router)")
                && m.contains("norm weight norm3 has dims [3], expected [2]"),
            "{m}"
        );
        let mut q = f.clone();
        set(&mut q, 9, 0);
        let m = invalid_msg(&q);
        assert!(
            m.contains("(router)") && m.contains("missing weight 9"),
            "{m}"
        );
        let mut q = f.clone();
        set(&mut q, 4, 2);
        let m = invalid_msg(&q);
        assert!(
            m.contains("instruction 2 (moe)")
                && m.contains("residual buffer r has width 4, expected 2"),
            "{m}"
        );
        let mut q = f.clone();
        set(&mut q, 4, 11);
        let m = invalid_msg(&q);
        assert!(
            m.contains("(moe)") && m.contains("missing buffer 11"),
            "{m}"
        );
        let mut q = f.clone();
        if let Instr::LmHead { norm, .. } = &mut q.programs[0].instrs[3] {
            *norm = Some((5, 1e-5));
        }
        let m = invalid_msg(&q);
        assert!(
            m.contains("instruction 3 (lm_head)") && m.contains("norm3"),
            "{m}"
        );
        // Renumbering reaches the new ids.
        let mut ins = f.programs[0].instrs[2].clone();
        ins.map_ids(|b| b + 10, |w| w + 100);
        assert!(matches!(
            ins,
            Instr::Moe {
                norm: Some((104, _)),
                residual: Some(10),
                x: 10,
                ..
            }
        ));
    }

    #[test]
    fn byte_counts() {
        assert_eq!(expected_bytes(DType::MXFP4, &[4, 64]), Some((128, 8)));
        assert_eq!(
            expected_bytes(DType::F8E4M3, &[200, 130]),
            Some((26000, 4 * 2 * 2))
        );
        assert_eq!(
            expected_bytes(DType::F8E4M3, &[3, 128, 256]),
            Some((3 * 128 * 256, 4 * 3 * 2))
        );
        assert_eq!(expected_bytes(DType::MXFP4, &[4, 33]), None);
    }
}
