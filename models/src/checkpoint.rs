//! Hugging Face checkpoint loading: `config.json`, safetensors shards (memory-mapped), tokenizer files.
//!
//! [`Checkpoint::open`] reads the config, finds the shards (`model.safetensors.index.json` or a single
//! `model.safetensors`), maps them, parses their headers, and validates every tensor the model needs
//! ([`expected_tensors`]) for presence, shape and dtype. Errors name the tensor or file at fault.

use crate::config::{Arch, MlpLayer, ModelConfig};
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Element type of a stored tensor (the ones this loader understands).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoredDType {
    F32,
    BF16,
    F16,
    F8E4M3,
    U8,
}

impl StoredDType {
    pub fn name(self) -> &'static str {
        match self {
            StoredDType::F32 => "F32",
            StoredDType::BF16 => "BF16",
            StoredDType::F16 => "F16",
            StoredDType::F8E4M3 => "F8_E4M3",
            StoredDType::U8 => "U8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StoredDType::F32 => 4,
            StoredDType::BF16 | StoredDType::F16 => 2,
            StoredDType::F8E4M3 | StoredDType::U8 => 1,
        }
    }

    fn from_safetensors(d: Dtype) -> Option<StoredDType> {
        match d {
            Dtype::F32 => Some(StoredDType::F32),
            Dtype::BF16 => Some(StoredDType::BF16),
            Dtype::F16 => Some(StoredDType::F16),
            Dtype::F8_E4M3 => Some(StoredDType::F8E4M3),
            Dtype::U8 => Some(StoredDType::U8),
            _ => None,
        }
    }
}

/// How the routed experts of a MoE checkpoint are stored (all MoE layers must agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertLayout {
    /// `mlp.experts.{e}.{gate,up,down}_proj.weight`, one 2-D tensor per expert and projection.
    PerExpert,
    /// `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I].
    Fused,
    /// gpt-oss style MXFP4: `mlp.experts.{gate_up,down}_proj_{blocks,scales}` (U8).
    Mxfp4,
}

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the shard file.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

impl Shard {
    fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}

/// An opened, validated Hugging Face checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub expert_layout: ExpertLayout,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("expert_layout", &self.expert_layout)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!(
                "checkpoint directory {} does not exist or is not a directory",
                dir.display()
            );
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;

        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{} is not valid JSON: {e}", index_path.display()))?;
            let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
                bail!("{} has no `weight_map` object", index_path.display());
            };
            let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
            for (name, file) in map {
                let Some(file) = file.as_str() else {
                    bail!(
                        "{}: weight_map entry for {name} is not a file name",
                        index_path.display()
                    );
                };
                let fp = Path::new(file);
                if fp.is_absolute()
                    || fp
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    bail!("{}: weight_map entry for {name} names a path outside the checkpoint: {file}", index_path.display());
                }
                weight_map.insert(name.clone(), file.to_string());
            }
            let files: BTreeSet<&String> = weight_map.values().collect();
            let mut shard_of: HashMap<&str, usize> = HashMap::new();
            let mut headers: Vec<HashMap<String, Entry>> = Vec::new();
            for file in files {
                let path = dir.join(file);
                if !path.is_file() {
                    bail!(
                        "shard {file} listed in {INDEX_FILE} does not exist in {}",
                        dir.display()
                    );
                }
                let idx = shards.len();
                let (shard, header) = map_shard(&path, idx)?;
                shards.push(shard);
                headers.push(header);
                shard_of.insert(file.as_str(), idx);
            }
            for (name, file) in &weight_map {
                let idx = shard_of[file.as_str()];
                let Some(entry) = headers[idx].remove(name) else {
                    bail!("tensor {name} is missing (expected in shard {file} per the index)");
                };
                tensors.insert(name.clone(), entry);
            }
        } else {
            let path = dir.join(SINGLE_FILE);
            if !path.is_file() {
                bail!("no {INDEX_FILE} and no {SINGLE_FILE} in {}", dir.display());
            }
            let (shard, header) = map_shard(&path, 0)?;
            shards.push(shard);
            tensors = header;
        }

        // The Hub (and transformers' save_pretrained) name the attention sinks `attention_sink_bias`; the
        // model's parameter is `sinks`. Accept either under the parameter's name.
        let aliases: Vec<(String, Entry)> = tensors
            .iter()
            .filter_map(|(n, e)| {
                n.strip_suffix(".self_attn.attention_sink_bias")
                    .map(|p| (format!("{p}.self_attn.sinks"), e.clone()))
            })
            .collect();
        for (n, e) in aliases {
            tensors.entry(n).or_insert(e);
        }
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            expert_layout: ExpertLayout::PerExpert,
            shards,
            tensors,
        };
        ck.expert_layout = ck.detect_layout()?;
        ck.validate()?;
        Ok(ck)
    }

    fn detect_layout(&self) -> Result<ExpertLayout> {
        let mut found: Option<(usize, ExpertLayout)> = None;
        for (i, l) in self.config.layers.iter().enumerate() {
            if !matches!(l.mlp, MlpLayer::Moe(_)) {
                continue;
            }
            let p = format!("model.layers.{i}.mlp.experts");
            let layout = if self.has(&format!("{p}.gate_up_proj_blocks")) {
                ExpertLayout::Mxfp4
            } else if self.has(&format!("{p}.gate_up_proj")) {
                ExpertLayout::Fused
            } else {
                ExpertLayout::PerExpert
            };
            match found {
                None => found = Some((i, layout)),
                Some((j, first)) if first != layout => {
                    bail!("MoE layer {i} stores its experts as {layout:?} but layer {j} as {first:?}; all layers must agree")
                }
                _ => {}
            }
        }
        Ok(found.map(|f| f.1).unwrap_or(ExpertLayout::PerExpert))
    }

    fn validate(&self) -> Result<()> {
        let fp8 = self.config.fp8.is_some();
        for (name, shape) in expected_tensors(&self.config, self.expert_layout) {
            let Some(e) = self.tensors.get(&name) else {
                bail!("tensor {name} is missing from the checkpoint");
            };
            if e.shape != shape {
                bail!("tensor {name}: shape {:?} expected {:?}", e.shape, shape);
            }
            let mxfp4 = self.expert_layout == ExpertLayout::Mxfp4 && name.contains(".mlp.experts.");
            match StoredDType::from_safetensors(e.dtype) {
                Some(StoredDType::U8) if mxfp4 => {}
                _ if mxfp4 => bail!(
                    "tensor {name}: unsupported dtype {} (MXFP4 expert tensors must be U8)",
                    e.dtype
                ),
                Some(StoredDType::F32 | StoredDType::BF16 | StoredDType::F16) => {}
                Some(StoredDType::F8E4M3) if fp8 && fp8_eligible(&name) => {
                    let sname = format!("{name}_scale_inv");
                    let Some(s) = self.tensors.get(&sname) else {
                        bail!("tensor {name} is F8_E4M3 but its scale tensor {sname} is missing");
                    };
                    let want = scale_shape(&shape, self.block());
                    if s.shape != want {
                        bail!("tensor {sname}: shape {:?} expected {:?}", s.shape, want);
                    }
                    if !matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                        bail!(
                            "tensor {sname}: unsupported dtype {} (expected F32)",
                            s.dtype
                        );
                    }
                }
                Some(StoredDType::F8E4M3) if !fp8 => {
                    bail!("tensor {name}: unsupported dtype F8_E4M3 (config.json has no fp8 quantization_config)")
                }
                _ => bail!("tensor {name}: unsupported dtype {}", e.dtype),
            }
        }
        Ok(())
    }

    fn block(&self) -> (usize, usize) {
        self.config
            .fp8
            .as_ref()
            .map(|q| q.block)
            .unwrap_or((128, 128))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} is not in the checkpoint"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    /// The stored dtype; `None` if the tensor is absent or of a type this loader does not handle.
    pub fn dtype(&self, name: &str) -> Option<StoredDType> {
        self.tensors
            .get(name)
            .and_then(|e| StoredDType::from_safetensors(e.dtype))
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// The stored bytes of a tensor (little-endian, row-major), e.g. for FP8 / MXFP4 passthrough.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        shard.bytes().get(e.start..e.end).ok_or_else(|| {
            anyhow!(
                "tensor {name}: byte range {}..{} is outside {}",
                e.start,
                e.end,
                shard.path.display()
            )
        })
    }

    /// The tensor converted to f32. F8_E4M3 tensors are dequantized with their `_scale_inv` block scales.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = self.raw_bytes(name)?;
        match e.dtype {
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::F8_E4M3 => self.dequant_fp8(name, &e.shape, bytes),
            Dtype::U8 => bail!("tensor {name} is U8 (packed data such as MXFP4); use raw_bytes"),
            other => bail!("tensor {name}: unsupported dtype {other}"),
        }
    }

    fn dequant_fp8(&self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<Vec<f32>> {
        let (lead, rows, cols) = match *shape {
            [r, c] => (1, r, c),
            [e, r, c] => (e, r, c),
            _ => bail!("tensor {name}: F8_E4M3 dequantization needs a 2-D or 3-D tensor, shape is {shape:?}"),
        };
        let sname = format!("{name}_scale_inv");
        if !self.has(&sname) {
            bail!("tensor {name} is F8_E4M3 but its scale tensor {sname} is missing");
        }
        let (br, bc) = self.block();
        let want = scale_shape(shape, (br, bc));
        let sshape = self.entry(&sname)?.shape.clone();
        if sshape != want {
            bail!("tensor {sname}: shape {sshape:?} expected {want:?}");
        }
        let scales = self.read_f32(&sname)?;
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let table = e4m3_table();
        let mut out = Vec::with_capacity(bytes.len());
        for x in 0..lead {
            for r in 0..rows {
                let srow = &scales[(x * sr + r / br) * sc..][..sc];
                let row = &bytes[(x * rows + r) * cols..][..cols];
                out.extend(
                    row.iter()
                        .enumerate()
                        .map(|(c, &b)| table[b as usize] * srow[c / bc]),
                );
            }
        }
        Ok(out)
    }

    /// The contents of `tokenizer.json` (must exist and be valid JSON).
    pub fn tokenizer_json(&self) -> Result<String> {
        let path = self.dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str::<Value>(&text)
            .map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))?;
        Ok(text)
    }

    /// `chat_template` from `tokenizer_config.json` if it is a string (else `chat_template.jinja` if present).
    pub fn chat_template(&self) -> Option<String> {
        let from_config = std::fs::read_to_string(self.dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|c| c.as_str())
                    .map(String::from)
            });
        from_config.or_else(|| std::fs::read_to_string(self.dir.join("chat_template.jinja")).ok())
    }
}

/// Map one shard file and parse its header into entries with absolute byte ranges.
fn map_shard(path: &Path, idx: usize) -> Result<(Shard, HashMap<String, Entry>)> {
    let file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading metadata of {}", path.display()))?
        .len();
    if len < 8 {
        bail!(
            "shard {} is not a valid safetensors file: only {len} bytes (truncated?)",
            path.display()
        );
    }
    // SAFETY: the file is opened read-only; checkpoints are not expected to be modified while loaded.
    let mmap = unsafe { Mmap::map(&file) }
        .with_context(|| format!("memory-mapping {}", path.display()))?;
    let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        let detail = match declared_size(&mmap) {
            Some(want) if want != mmap.len() => {
                format!(
                    "its header describes {want} bytes but the file has {}",
                    mmap.len()
                )
            }
            _ => e.to_string(),
        };
        anyhow!(
            "shard {} is not a valid safetensors file (truncated or corrupt): {detail}",
            path.display()
        )
    })?;
    let base = 8 + n;
    let mut out = HashMap::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        out.insert(
            name,
            Entry {
                shard: idx,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: base + s,
                end: base + e,
            },
        );
    }
    Ok((
        Shard {
            path: path.to_path_buf(),
            mmap,
        },
        out,
    ))
}

/// The file size a safetensors header promises (8 + header + data), if the header is readable JSON.
fn declared_size(bytes: &[u8]) -> Option<usize> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data = header
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    (8 + n).checked_add(usize::try_from(data).ok()?)
}

/// Shape of the `_scale_inv` companion of an FP8 weight of shape `shape`.
fn scale_shape(shape: &[usize], (br, bc): (usize, usize)) -> Vec<usize> {
    let mut s = shape.to_vec();
    let n = s.len();
    if n >= 2 {
        s[n - 2] = s[n - 2].div_ceil(br);
        s[n - 1] = s[n - 1].div_ceil(bc);
    }
    s
}

/// Whether a tensor may be stored as block-quantized FP8: attention projections, dense MLP and expert weights.
pub fn fp8_eligible(name: &str) -> bool {
    if name.contains(".mlp.experts.") {
        return !name.ends_with("_blocks") && !name.ends_with("_scales") && !name.ends_with("bias");
    }
    const SUFFIXES: [&str; 7] = [
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
        ".self_attn.o_proj.weight",
        ".mlp.gate_proj.weight",
        ".mlp.up_proj.weight",
        ".mlp.down_proj.weight",
    ];
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Decode table for OCP FP8 E4M3 (bias 7, no infinities, 0x7f / 0xff are NaN, subnormals when the exponent is 0).
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let exp = ((b >> 3) & 0xf) as i32;
            let man = (b & 7) as f32;
            *v = if exp == 0xf && b & 7 == 7 {
                f32::NAN
            } else if exp == 0 {
                sign * (man / 8.0) * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })
}

/// Encode an f32 as the nearest E4M3 value (saturating at +-448; NaN maps to 0x7f; ties to even).
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let t = e4m3_table();
    let a = x.abs();
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    // codes 0x00..=0x7e are monotonically increasing magnitudes (0 .. 448)
    let code = if a >= t[0x7e] {
        0x7e
    } else {
        // first code whose value is >= a
        let hi = t[..0x7f].partition_point(|&v| v < a);
        if hi == 0 {
            0
        } else {
            let lo = hi - 1;
            let (dl, dh) = (a - t[lo], t[hi] - a);
            if dl < dh || (dl == dh && lo % 2 == 0) {
                lo
            } else {
                hi
            }
        }
    } as u8;
    sign | code
}

/// Every tensor the model needs, with its expected shape (FP8 `_scale_inv` companions are not listed).
pub fn expected_tensors(cfg: &ModelConfig, layout: ExpertLayout) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden;
    let mut out: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![cfg.vocab, h])];
    let attn = |out: &mut Vec<(String, Vec<usize>)>, p: &str, a: &crate::config::AttnLayer| {
        let (q, kv, v, o) = (
            a.n_heads * a.head_dim,
            a.n_kv_heads * a.head_dim,
            a.n_kv_heads * a.v_head_dim,
            a.n_heads * a.v_head_dim,
        );
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![v, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, o]));
        if a.qkv_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![v]));
        }
        if a.sinks {
            out.push((format!("{p}.self_attn.sinks"), vec![a.n_heads]));
        }
    };
    let dense = |out: &mut Vec<(String, Vec<usize>)>, p: &str, inter: usize| {
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
    };
    for (i, l) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        attn(&mut out, &p, &l.attn);
        match &l.mlp {
            MlpLayer::Dense { inter } => dense(&mut out, &p, *inter),
            MlpLayer::Moe(m) => {
                let (e, inter) = (m.n_experts, m.inter);
                out.push((format!("{p}.mlp.gate.weight"), vec![e, h]));
                out.push((format!("{p}.mlp.gate.e_score_correction_bias"), vec![e]));
                let x = format!("{p}.mlp.experts");
                match layout {
                    ExpertLayout::PerExpert => {
                        for j in 0..e {
                            out.push((format!("{x}.{j}.gate_proj.weight"), vec![inter, h]));
                            out.push((format!("{x}.{j}.up_proj.weight"), vec![inter, h]));
                            out.push((format!("{x}.{j}.down_proj.weight"), vec![h, inter]));
                        }
                    }
                    ExpertLayout::Fused => {
                        out.push((format!("{x}.gate_up_proj"), vec![e, 2 * inter, h]));
                        out.push((format!("{x}.down_proj"), vec![e, h, inter]));
                    }
                    ExpertLayout::Mxfp4 => {
                        out.push((
                            format!("{x}.gate_up_proj_blocks"),
                            vec![e, 2 * inter, h / 32, 16],
                        ));
                        out.push((
                            format!("{x}.gate_up_proj_scales"),
                            vec![e, 2 * inter, h / 32],
                        ));
                        out.push((format!("{x}.down_proj_blocks"), vec![e, h, inter / 32, 16]));
                        out.push((format!("{x}.down_proj_scales"), vec![e, h, inter / 32]));
                    }
                }
            }
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab, h]));
    }
    if cfg.arch == Arch::Mimo {
        if let Some(l0) = cfg.layers.first() {
            let inter = match l0.mlp {
                MlpLayer::Dense { inter } => inter,
                MlpLayer::Moe(ref m) => m.inter,
            };
            for j in 0..cfg.mtp_layers {
                let p = format!("model.mtp_layers.{j}");
                for n in [
                    "input_layernorm",
                    "post_attention_layernorm",
                    "token_layernorm",
                    "hidden_layernorm",
                    "final_layernorm",
                ] {
                    out.push((format!("{p}.{n}.weight"), vec![h]));
                }
                out.push((format!("{p}.input_proj.weight"), vec![h, 2 * h]));
                attn(&mut out, &p, &l0.attn);
                dense(&mut out, &p, inter);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{make_tiny, TinyOptions};
    use safetensors::tensor::TensorView;

    type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

    fn tiny(root: &Path, name: &str, arch: Arch, fp8: bool) -> PathBuf {
        let dir = root.join(name);
        make_tiny(
            &dir,
            &TinyOptions {
                arch,
                seed: 1,
                fp8,
                fused_experts: false,
            },
        )
        .unwrap();
        dir
    }

    fn err(dir: &Path) -> String {
        format!("{:#}", Checkpoint::open(dir).unwrap_err())
    }

    fn shard_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    }

    fn read_raw(path: &Path) -> Vec<Raw> {
        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<Raw> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn write_raw(path: &Path, tensors: &[Raw]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let bytes =
            safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), None).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Merge all shards into a single `model.safetensors` (dropping the index), editing the tensor list on the way.
    fn to_single(dir: &Path, edit: impl FnOnce(&mut Vec<Raw>)) {
        let mut all = Vec::new();
        for p in shard_files(dir) {
            all.extend(read_raw(&p));
            std::fs::remove_file(p).unwrap();
        }
        std::fs::remove_file(dir.join(INDEX_FILE)).unwrap();
        edit(&mut all);
        write_raw(&dir.join(SINGLE_FILE), &all);
    }

    #[test]
    fn e4m3_table_and_encode() {
        let t = e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0);
        assert_eq!(t[0x7e], 448.0);
        assert_eq!(t[0xfe], -448.0);
        assert_eq!(t[0x08], 2f32.powi(-6));
        assert_eq!(t[0x01], 2f32.powi(-9));
        assert_eq!(t[0x07], 7.0 * 2f32.powi(-9));
        assert!(t[0x7f].is_nan() && t[0xff].is_nan());
        assert!(t.iter().filter(|v| v.is_nan()).count() == 2);
        for b in 0..=255u8 {
            if b != 0x7f && b != 0xff && b != 0x80 {
                assert_eq!(e4m3_encode(t[b as usize]), b, "{b:#x}");
            }
        }
        assert_eq!(e4m3_encode(1e6), 0x7e);
        assert_eq!(e4m3_encode(-1e6), 0xfe);
        assert_eq!(e4m3_encode(1.0625), 0x38); // tie between 1.0 and 1.125 -> even
        assert_eq!(e4m3_encode(1.07), 0x39);
    }

    #[test]
    fn opens_single_file_and_reports_names() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::Mimo, false);
        let before = Checkpoint::open(&dir).unwrap();
        let norm = before.read_f32("model.norm.weight").unwrap();
        let n = before.names().len();
        drop(before);
        to_single(&dir, |_| {});
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.names().len(), n);
        let names = ck.names();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ck.read_f32("model.norm.weight").unwrap(), norm);
        assert_eq!(ck.raw_bytes("model.norm.weight").unwrap().len(), 64 * 2);
        assert!(ck.read_f32("nope").is_err());
    }

    #[test]
    fn extra_tensors_allowed_unsupported_dtype_rejected() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::Mimo, false);
        to_single(&dir, |t| {
            t.push(("model.mtp.extra".into(), Dtype::I64, vec![2], vec![0; 16]));
        });
        let ck = Checkpoint::open(&dir).unwrap();
        assert!(ck.has("model.mtp.extra") && ck.dtype("model.mtp.extra").is_none());
        drop(ck);

        let dir = tiny(td.path(), "e", Arch::Mimo, false);
        to_single(&dir, |t| {
            let e = t.iter_mut().find(|e| e.0 == "model.norm.weight").unwrap();
            e.1 = Dtype::I32;
            e.3 = vec![1; 64 * 4];
        });
        let e = err(&dir);
        assert!(
            e.contains("tensor model.norm.weight: unsupported dtype I32"),
            "{e}"
        );
    }

    #[test]
    fn missing_tensor_in_shard() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, false);
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
        let shard = index["weight_map"]["model.norm.weight"]
            .as_str()
            .unwrap()
            .to_string();
        let path = dir.join(&shard);
        let mut t = read_raw(&path);
        t.retain(|e| e.0 != "model.norm.weight");
        write_raw(&path, &t);
        let e = err(&dir);
        assert!(
            e.contains(&format!(
                "tensor model.norm.weight is missing (expected in shard {shard} per the index)"
            )),
            "{e}"
        );
    }

    #[test]
    fn missing_expected_tensor() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, false);
        to_single(&dir, |t| {
            t.retain(|e| e.0 != "model.layers.2.self_attn.attention_sink_bias")
        });
        let e = err(&dir);
        assert!(
            e.contains("tensor model.layers.2.self_attn.sinks is missing"),
            "{e}"
        );
    }

    #[test]
    fn wrong_shape_names_tensor_and_shapes() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, false);
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["hidden_size"] = 128.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = err(&dir);
        assert!(
            e.contains("tensor model.embed_tokens.weight: shape [512, 64] expected [512, 128]"),
            "{e}"
        );

        let dir = tiny(td.path(), "e", Arch::MimoV2Flash, false);
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["num_key_value_heads"] = 2.into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = err(&dir);
        assert!(
            e.contains(
                "tensor model.layers.0.self_attn.k_proj.weight: shape [32, 64] expected [64, 64]"
            ),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_garbage_shards() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::Mimo, false);
        let shard = shard_files(&dir).pop().unwrap();
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(&dir);
        let fname = shard.file_name().unwrap().to_str().unwrap();
        assert!(
            e.contains(fname) && e.contains("truncated") && e.contains("header describes"),
            "{e}"
        );

        std::fs::write(
            &shard,
            b"this is certainly not a safetensors file, just some text",
        )
        .unwrap();
        let e = err(&dir);
        assert!(e.contains(fname), "{e}");
        std::fs::write(&shard, [0xffu8; 5]).unwrap();
        let e = err(&dir);
        assert!(e.contains(fname), "{e}");
        std::fs::write(&shard, [0xffu8; 4096]).unwrap();
        let e = err(&dir);
        assert!(e.contains(fname), "{e}");
    }

    #[test]
    fn missing_shard_and_bad_config() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::Mimo, false);
        let shard = shard_files(&dir).remove(0);
        std::fs::remove_file(&shard).unwrap();
        let e = err(&dir);
        let fname = shard.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(fname) && e.contains("does not exist"), "{e}");

        let dir = tiny(td.path(), "e", Arch::Mimo, false);
        std::fs::write(dir.join("config.json"), "{ garbage ]").unwrap();
        let e = err(&dir);
        assert!(
            e.contains("config.json") && e.contains("not valid JSON"),
            "{e}"
        );

        std::fs::write(dir.join(INDEX_FILE), "nope").unwrap();
        std::fs::write(
            dir.join("config.json"),
            crate::tiny::tiny_config_json(Arch::Mimo, false).to_string(),
        )
        .unwrap();
        let e = err(&dir);
        assert!(
            e.contains(INDEX_FILE) && e.contains("not valid JSON"),
            "{e}"
        );

        let e = format!(
            "{:#}",
            Checkpoint::open(&td.path().join("absent")).unwrap_err()
        );
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn fp8_scale_companion_required() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, true);
        let ck = Checkpoint::open(&dir).unwrap();
        let w = "model.layers.1.mlp.experts.3.down_proj.weight";
        assert_eq!(ck.dtype(w), Some(StoredDType::F8E4M3));
        assert_eq!(ck.shape(&format!("{w}_scale_inv")), Some(vec![1, 1]));
        assert_eq!(ck.raw_bytes(w).unwrap().len(), 64 * 32);
        drop(ck);
        to_single(&dir, |t| {
            t.retain(|e| e.0 != "model.layers.0.self_attn.o_proj.weight_scale_inv")
        });
        let e = err(&dir);
        assert!(
            e.contains("model.layers.0.self_attn.o_proj.weight_scale_inv is missing"),
            "{e}"
        );

        // FP8 weights without a quantization_config are rejected
        let dir = tiny(td.path(), "e", Arch::Mimo, true);
        std::fs::write(
            dir.join("config.json"),
            crate::tiny::tiny_config_json(Arch::Mimo, false).to_string(),
        )
        .unwrap();
        let e = err(&dir);
        assert!(e.contains("unsupported dtype F8_E4M3"), "{e}");
    }

    #[test]
    fn fp8_dequant_multi_block() {
        // a 3-D [2, 200, 130] tensor: scales [2, 2, 2], partial edge blocks
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, true);
        let (e, r, c) = (2usize, 200usize, 130usize);
        let scales: Vec<f32> = (0..8).map(|i| 0.5 + i as f32).collect();
        let q: Vec<u8> = (0..e * r * c).map(|i| (i % 0x7e) as u8).collect();
        to_single(&dir, |t| {
            t.push((
                "extra.weight".into(),
                Dtype::F8_E4M3,
                vec![e, r, c],
                q.clone(),
            ));
            let sb = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            t.push((
                "extra.weight_scale_inv".into(),
                Dtype::F32,
                vec![e, 2, 2],
                sb,
            ));
        });
        let ck = Checkpoint::open(&dir).unwrap();
        let v = ck.read_f32("extra.weight").unwrap();
        let tab = e4m3_table();
        for x in 0..e {
            for i in [0, 127, 128, 199] {
                for j in [0, 127, 128, 129] {
                    let k = (x * r + i) * c + j;
                    let s = scales[x * 4 + (i / 128) * 2 + j / 128];
                    assert_eq!(v[k], tab[q[k] as usize] * s);
                }
            }
        }
    }

    #[test]
    fn expert_layouts() {
        let td = tempfile::tempdir().unwrap();
        let dir = tiny(td.path(), "d", Arch::MimoV2Flash, false);
        let cfg = Checkpoint::open(&dir).unwrap().config;
        // Mxfp4: replace the per-expert tensors by U8 blocks/scales
        let mx: Vec<(String, Vec<usize>)> = expected_tensors(&cfg, ExpertLayout::Mxfp4)
            .into_iter()
            .filter(|(n, _)| n.ends_with("_blocks") || n.ends_with("_scales"))
            .collect();
        assert_eq!(mx.len(), 12);
        assert!(mx.iter().any(
            |(n, s)| n == "model.layers.1.mlp.experts.gate_up_proj_blocks"
                && s == &vec![8, 64, 2, 16]
        ));
        to_single(&dir, |t| {
            t.retain(|e| !e.0.contains(".mlp.experts."));
            for (n, s) in &mx {
                t.push((
                    n.clone(),
                    Dtype::U8,
                    s.clone(),
                    vec![0x11; s.iter().product()],
                ));
            }
        });
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.expert_layout, ExpertLayout::Mxfp4);
        assert_eq!(
            ck.dtype("model.layers.3.mlp.experts.down_proj_scales"),
            Some(StoredDType::U8)
        );
        assert!(ck
            .read_f32("model.layers.3.mlp.experts.down_proj_scales")
            .is_err());

        // mixed layouts are rejected
        let dir = td.path().join("mixed");
        make_tiny(
            &dir,
            &TinyOptions {
                arch: Arch::MimoV2Flash,
                seed: 1,
                fp8: false,
                fused_experts: true,
            },
        )
        .unwrap();
        to_single(&dir, |t| {
            t.retain(|e| !e.0.starts_with("model.layers.2.mlp.experts."));
            for j in 0..8 {
                for (p, s) in [
                    ("gate_proj", [32, 64]),
                    ("up_proj", [32, 64]),
                    ("down_proj", [64, 32]),
                ] {
                    t.push((
                        format!("model.layers.2.mlp.experts.{j}.{p}.weight"),
                        Dtype::BF16,
                        s.to_vec(),
                        vec![0x3f; 4096],
                    ));
                }
            }
        });
        let e = err(&dir);
        assert!(
            e.contains("MoE layer 2") && e.contains("PerExpert") && e.contains("Fused"),
            "{e}"
        );
    }
}
