//! Packing weights into `weights.bin`: each weight node's values are gathered from the checkpoint (concatenated /
//! stacked as its [`WeightSource`] says), encoded in the node's dtype, and written at a 256-byte aligned offset.
//! The file is written to a temporary name and renamed at the end, and hashed (xxh3-64) as it is written.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use mimo_ir::plan::{expected_bytes, WeightDesc, WEIGHT_ALIGN};
use mimo_ir::*;
use mimo_kernels::quant::{quantize_fp8_blocked, quantize_mxfp4};
use mimo_models::checkpoint::{Checkpoint, StoredDType};
use std::io::Write;
use std::path::Path;

/// Values of a weight as f32 (row-major over its dims).
pub fn gather_f32(ck: &Checkpoint, src: &WeightSource) -> Result<Vec<f32>> {
    Ok(match src {
        WeightSource::Tensor(n) | WeightSource::Fused3d(n) => ck.read_f32(n)?,
        WeightSource::ConcatRows(names) => {
            let mut v = vec![];
            for n in names {
                v.extend(ck.read_f32(n)?);
            }
            v
        }
        WeightSource::StackExperts(experts) => {
            let mut v = vec![];
            for parts in experts {
                for n in parts {
                    v.extend(ck.read_f32(n)?);
                }
            }
            v
        }
        WeightSource::Mxfp4 { blocks, scales } => {
            let b = ck.raw_bytes(blocks)?;
            let s = ck.raw_bytes(scales)?;
            let shape = ck.shape(blocks).unwrap_or_default();
            let cols = shape
                .len()
                .checked_sub(2)
                .map(|i| shape[i] * 32)
                .unwrap_or(0);
            if cols == 0 {
                bail!("MXFP4 blocks tensor {blocks} has shape {shape:?}, expected [.., K/32, 16]");
            }
            let rows = b.len() * 2 / cols;
            let m =
                mimo_kernels::quant::Mxfp4Matrix::from_parts(rows, cols, b.to_vec(), s.to_vec())
                    .with_context(|| format!("MXFP4 experts {blocks}"))?;
            m.dequantize()
        }
    })
}

/// Encode one weight into (data bytes, scale bytes).
pub fn encode_weight(
    ck: &Checkpoint,
    src: &WeightSource,
    dtype: DType,
    dims: &[usize],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let n: usize = dims.iter().product();
    // Pass-through of data that is already in the target format.
    match (src, dtype) {
        (WeightSource::Mxfp4 { blocks, scales }, DType::MXFP4) => {
            return Ok((
                ck.raw_bytes(blocks)?.to_vec(),
                ck.raw_bytes(scales)?.to_vec(),
            ));
        }
        (WeightSource::Tensor(t), DType::F8E4M3)
            if ck.dtype(t) == Some(StoredDType::F8E4M3) && dims.len() == 2 =>
        {
            let data = ck.raw_bytes(t)?.to_vec();
            let scales = ck.raw_bytes(&format!("{t}_scale_inv"))?.to_vec();
            return Ok((data, scales));
        }
        (WeightSource::Mxfp4 { .. }, other) => bail!(
            "MXFP4 checkpoint experts cannot be packed as {}",
            other.name()
        ),
        _ => {}
    }
    let v = gather_f32(ck, src)?;
    if v.len() != n {
        bail!(
            "weight {}: gathered {} values, shape {:?} needs {n}",
            src.describe(),
            v.len(),
            dims
        );
    }
    let last = *dims.last().unwrap_or(&1);
    Ok(match dtype {
        DType::F32 => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![]),
        DType::BF16 => (
            v.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            vec![],
        ),
        DType::F16 => (
            v.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            vec![],
        ),
        DType::MXFP4 => {
            let m = quantize_mxfp4(&v, n / last, last)
                .with_context(|| format!("quantizing {}", src.describe()))?;
            (m.blocks, m.scales)
        }
        DType::F8E4M3 => {
            let (r, c) = if dims.len() >= 2 {
                (dims[dims.len() - 2], last)
            } else {
                (1, last)
            };
            let mut data = Vec::with_capacity(n);
            let mut scales = vec![];
            for chunk in v.chunks(r * c) {
                let m = quantize_fp8_blocked(chunk, r, c, (128, 128))
                    .with_context(|| format!("quantizing {}", src.describe()))?;
                data.extend(m.data);
                scales.extend(m.scale_inv.iter().flat_map(|s| s.to_le_bytes()));
            }
            (data, scales)
        }
        other => bail!("cannot pack a weight as {}", other.name()),
    })
}

fn align(x: u64) -> u64 {
    x.div_ceil(WEIGHT_ALIGN) * WEIGHT_ALIGN
}

/// Pack `nodes` (weight nodes of `g`) into `dir/weights.bin`. Returns descriptors, file length and hash.
/// Where packed weight bytes come from: a checkpoint, or synthetic random data (benchmark models).
pub trait WeightProvider: Sync {
    fn encode(
        &self,
        src: &WeightSource,
        dtype: DType,
        dims: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>)>;
}

impl WeightProvider for Checkpoint {
    fn encode(
        &self,
        src: &WeightSource,
        dtype: DType,
        dims: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        encode_weight(self, src, dtype, dims)
    }
}

pub fn pack_weights(
    ck: &dyn WeightProvider,
    graphs: &[(&Graph, &[NodeId])],
    dir: &Path,
    progress: bool,
) -> Result<(Vec<WeightDesc>, u64, u64)> {
    let total: usize = graphs.iter().map(|(_, n)| n.len()).sum();
    let pb = if progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("packing weights [{bar:40}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let tmp = dir.join("weights.bin.tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut off = 0u64;
    let mut put =
        |bytes: &[u8], off: &mut u64, w: &mut std::io::BufWriter<std::fs::File>| -> Result<u64> {
            let start = align(*off);
            let pad = vec![0u8; (start - *off) as usize];
            w.write_all(&pad)?;
            hasher.update(&pad);
            w.write_all(bytes)?;
            hasher.update(bytes);
            *off = start + bytes.len() as u64;
            Ok(start)
        };
    let mut descs = vec![];
    for (g, nodes) in graphs {
        for &n in nodes.iter() {
            let node = g.node(n);
            let Op::Weight {
                name,
                source,
                class,
            } = &node.op
            else {
                bail!("node {} is not a weight", node.name)
            };
            pb.set_message(name.clone());
            let dims = node.ty.fixed_dims().expect("weights have fixed dims");
            let (data, scales) = ck
                .encode(source, node.ty.dtype, &dims)
                .with_context(|| format!("packing weight {name}"))?;
            let want = expected_bytes(node.ty.dtype, &dims);
            if want != Some((data.len() as u64, scales.len() as u64)) {
                bail!(
                    "weight {name}: packed {}+{} bytes, {} {:?} needs {:?}",
                    data.len(),
                    scales.len(),
                    node.ty.dtype.name(),
                    dims,
                    want
                );
            }
            let offset = put(&data, &mut off, &mut w)?;
            let scale_offset = if scales.is_empty() {
                0
            } else {
                put(&scales, &mut off, &mut w)?
            };
            descs.push(WeightDesc {
                name: name.clone(),
                dtype: node.ty.dtype,
                dims,
                class: *class,
                offset,
                nbytes: data.len() as u64,
                scale_offset,
                scale_nbytes: scales.len() as u64,
            });
            pb.inc(1);
        }
    }
    let end = align(off);
    let pad = vec![0u8; (end - off) as usize];
    w.write_all(&pad)?;
    hasher.update(&pad);
    w.flush()?;
    drop(w);
    let path = dir.join(mimo_ir::plan::WEIGHTS_FILE);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    pb.finish_and_clear();
    Ok((descs, end, hasher.digest()))
}
