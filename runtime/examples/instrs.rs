fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let m = mimo_runtime::model::Model::load(&dir, false).unwrap();
    let prog = m.plan.program("target").unwrap();
    let enc = mimo_kernels::device::encode(&m.plan, prog, 512, true).unwrap();
    for (i, d) in enc.instrs.iter().enumerate() {
        println!(
            "{i:3} op {:2} fmt {} ntiles {:5} tile_rows {:4} k {:6} epi {:x} e {} rot {}",
            d.op, d.fmt, d.ntiles, d.tile_rows, d.k, d.epi, d.e, d.rot
        );
    }
}
