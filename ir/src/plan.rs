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
pub const FORMAT_VERSION: u32 = 1;
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
    /// Routing buffers hold, per token, `top_k` expert indices (as f32) then `top_k` weights.
    Router {
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        out: BufId,
        spec: RouterSpec,
    },
    Moe {
        x: BufId,
        routing: BufId,
        gate_up: WeightId,
        down: WeightId,
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
    LmHead {
        x: BufId,
        w: WeightId,
        out: BufId,
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

impl Plan {
    /// Structural checks so that a runtime never indexes out of bounds on a well-formed-but-wrong plan.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Invalid(m));
        for b in &self.buffers {
            if b.offset + b.width * self.max_tokens > self.arena_len {
                return bad(format!("buffer {} exceeds the arena", b.name));
            }
        }
        for w in &self.weights {
            if w.offset + w.nbytes > self.weights_len
                || w.scale_offset + w.scale_nbytes > self.weights_len
            {
                return bad(format!("weight {} lies outside weights.bin", w.name));
            }
            let expect = expected_bytes(w.dtype, &w.dims);
            if expect != Some((w.nbytes, w.scale_nbytes)) {
                return bad(format!(
                    "weight {}: {} bytes for {} {:?}",
                    w.name,
                    w.nbytes,
                    w.dtype.name(),
                    w.dims
                ));
            }
        }
        let nb = self.buffers.len() as u32;
        let nw = self.weights.len() as u32;
        for p in &self.programs {
            for (i, ins) in p.instrs.iter().enumerate() {
                let (bufs, ws) = instr_refs(ins);
                if bufs.iter().any(|&b| b >= nb) || ws.iter().any(|&w| w >= nw) {
                    return bad(format!(
                        "program {} instruction {i} ({}) refers to a missing buffer or weight",
                        p.name,
                        ins.mnemonic()
                    ));
                }
                if let Instr::KvWrite { layer, .. }
                | Instr::Attention {
                    spec: AttnSpec { layer, .. },
                    ..
                } = ins
                {
                    if !self.kv.iter().any(|k| k.layer == *layer) {
                        return bad(format!(
                            "instruction {i} uses the cache of layer {layer}, which has none"
                        ));
                    }
                }
            }
            if p.outputs.iter().any(|(_, b)| *b >= nb) {
                return bad(format!(
                    "program {} has an output outside the buffers",
                    p.name
                ));
            }
        }
        Ok(())
    }
}

/// Bytes of data and of scales for a weight of this dtype and shape.
pub fn expected_bytes(dtype: DType, dims: &[usize]) -> Option<(u64, u64)> {
    let n: usize = dims.iter().product();
    let last = *dims.last()?;
    let rows = n / last.max(1);
    Some(match dtype {
        DType::F32 => (4 * n as u64, 0),
        DType::BF16 | DType::F16 => (2 * n as u64, 0),
        DType::F8E4M3 => {
            // Blocks of 128x128 over the last two dims; leading dims (experts) multiply.
            let (r, c) = if dims.len() >= 2 {
                (dims[dims.len() - 2], last)
            } else {
                (1, last)
            };
            let lead = n / (r * c).max(1);
            (
                n as u64,
                4 * (lead * r.div_ceil(128) * c.div_ceil(128)) as u64,
            )
        }
        DType::MXFP4 => {
            if last % 32 != 0 {
                return None;
            }
            (n as u64 / 2, (rows * last / 32) as u64)
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
            x, w, bias, out, ..
        } => {
            let mut ws = vec![*w];
            ws.extend(bias);
            (vec![*x, *out], ws)
        }
        Instr::Moe {
            x,
            routing,
            gate_up,
            down,
            out,
            ..
        } => (vec![*x, *routing, *out], vec![*gate_up, *down]),
        Instr::SwiGlu { x, out } | Instr::Scale { x, out, .. } => (vec![*x, *out], vec![]),
        Instr::Add { a, b, out } => (vec![*a, *b, *out], vec![]),
        Instr::LmHead { x, w, out } => (vec![*x, *out], vec![*w]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            arena_len: 8,
            buffers: vec![BufferDesc {
                name: "x".into(),
                width: 2,
                offset: 0,
            }],
            weights: vec![WeightDesc {
                name: "e".into(),
                dtype: DType::F32,
                dims: vec![4, 2],
                class: WeightClass::Embedding,
                offset: 0,
                nbytes: 32,
                scale_offset: 0,
                scale_nbytes: 0,
            }],
            kv: vec![],
            programs: vec![Program {
                name: "target".into(),
                instrs: vec![Instr::Embed { table: 0, out: 0 }],
                outputs: vec![("logits".into(), 0)],
            }],
            passes: vec![],
            tokenizer_json: "{}".into(),
            chat_template: None,
            weights_len: 256,
        }
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
