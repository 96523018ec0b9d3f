//! The device instruction stream of a compiled plan, one line per instruction (op code, weight format, tiles,
//! rows per tile, K, epilogue codes, fused-router experts, block rotation): how the encoder lays a layer out on the
//! blocks, e.g. which instructions leave blocks idle; then the size of the v18 pre-tiled weight copy the CUDA
//! runtime makes of it (`mimo_kernels::tiled`).
//!
//!     cargo run --release -p mimo-runtime --example instrs -- <plan dir> [max context, default 512]
use anyhow::{anyhow, Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow!("usage: instrs <plan dir> [max context]"))?,
    );
    let ctx: usize = match args.next() {
        Some(a) => a
            .parse()
            .with_context(|| format!("max context {a:?} is not a number"))?,
        None => 512,
    };
    let m = mimo_runtime::model::Model::load(&dir, false)?;
    let prog = m
        .plan
        .program("target")
        .ok_or_else(|| anyhow!("plan has no target program"))?;
    let enc = mimo_kernels::device::encode(&m.plan, prog, ctx, true)
        .map_err(|e| anyhow!("encoding the plan: {e}"))?;
    for (i, d) in enc.instrs.iter().enumerate() {
        println!(
            "{i:4} op {:2} fmt {} ntiles {:6} tile_rows {:4} k {:7} epi {:6x} e {:4} rot {}",
            d.op, d.fmt, d.ntiles, d.tile_rows, d.k, d.epi, d.e, d.rot
        );
    }
    let tp = mimo_kernels::tiled::tile_plan(&m.plan.weights, &enc.instrs);
    println!(
        "tiled copy: {:.3} GB in {} copies (weights {:.3} GB)",
        tp.bytes as f64 / 1e9,
        tp.jobs.len(),
        m.plan.weights_len as f64 / 1e9
    );
    Ok(())
}
