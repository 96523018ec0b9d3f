//! The megakernel's activation rows in B-fragment order (`megakernel.cu`: `store8`, `frag_hi`, and the consumers'
//! `xa` addresses in `ring_consume` / `mma_steps`), emulated on the CPU: every 8-column unit of a row is 32 bytes,
//! its f16 hi half and lo half 16 bytes each, and with `MK_XSWZ` odd rows store the lo half first. The consumers'
//! 16-byte shared loads put two rows in each quarter-warp phase; rows a multiple of 128 bytes apart (every K chunk
//! width) would then hit the same banks. The test below reads back what the loaders wrote through the consumers'
//! addresses and counts shared-memory wavefronts.

/// Whether the default build's odd rows swap their halves (the kernel's `MK_XSWZ`: 1 since s15r1; the test below
/// checks both layouts).
pub const XSWZ: bool = true;

/// Byte offset of the hi half inside a 32-byte unit of activation row `j` (`frag_hi`).
pub fn frag_hi(j: usize, swz: bool) -> usize {
    if swz {
        16 * (j & 1)
    } else {
        0
    }
}

/// Byte address the loaders write half `lo` (false: hi) of unit `c` of row `j` to (`store8` with `frag`), rows at
/// `xstride` floats.
pub fn write_addr(j: usize, c: usize, lo: bool, xstride: usize, swz: bool) -> usize {
    j * xstride * 4 + 32 * c + (frag_hi(j, swz) ^ if lo { 16 } else { 0 })
}

/// The consumer's loads for lane (gq, tq) at K step `s` (32 columns a step): the unpacked form (column tile `nt`:
/// token nt * 8 + gq; hi at `xa`, lo at `xa ^ 16`) or the packed one (T <= 4: lanes gq < 4 read token gq's hi
/// half, lanes gq >= 4 token gq - 4's lo half). Returns (address, token, is lo) per load.
pub fn reader(
    gq: usize,
    tq: usize,
    s: usize,
    nt: usize,
    packed: bool,
    xstride: usize,
    swz: bool,
) -> Vec<(usize, usize, bool)> {
    if packed {
        let j = gq & 3;
        let lo = gq >= 4;
        let xa = j * xstride * 4 + 32 * tq + (frag_hi(j, swz) ^ if lo { 16 } else { 0 });
        vec![(xa + 128 * s, j, lo)]
    } else {
        let j = nt * 8 + gq;
        let xa = j * xstride * 4 + 32 * tq + frag_hi(j, swz);
        let hi = xa + 128 * s;
        vec![(hi, j, false), (hi ^ 16, j, true)]
    }
}

/// Shared-memory wavefronts of one warp-wide 16-byte load (`None`: the lane loads nothing): four phases of eight
/// lanes; within a phase, distinct 16-byte words on the same four banks serialize. Also returns the minimum (one
/// per phase with a loading lane).
pub fn wavefronts(addrs: &[Option<usize>; 32]) -> (usize, usize) {
    let (mut total, mut min) = (0, 0);
    for ph in 0..4 {
        let mut per_group: [Vec<usize>; 8] = Default::default();
        for a in addrs[ph * 8..ph * 8 + 8].iter().flatten() {
            let g = &mut per_group[(a / 16) % 8];
            if !g.contains(&(a / 16)) {
                g.push(a / 16);
            }
        }
        let w = per_group.iter().map(|g| g.len()).max().unwrap_or(0);
        total += w;
        min += w.min(1);
    }
    (total, min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every load of every lane reads back the half of the unit the loaders wrote for that token and step; the
    /// wavefronts of all loads (per column tile and half) over the row's K steps, and their minimum.
    fn check(tokens: usize, xstride: usize, swz: bool) -> (usize, usize) {
        let steps = xstride / 32;
        let mut mem: HashMap<usize, (usize, usize, bool)> = HashMap::new();
        for j in 0..tokens {
            for c in 0..xstride / 8 {
                for lo in [false, true] {
                    let a = write_addr(j, c, lo, xstride, swz);
                    assert!(
                        a.is_multiple_of(16) && mem.insert(a, (j, c, lo)).is_none(),
                        "two halves at byte {a}"
                    );
                }
            }
        }
        let packed = tokens <= 4;
        let nts = if packed { 1 } else { tokens.div_ceil(8) };
        let (mut waves, mut min) = (0, 0);
        for s in 0..steps {
            for nt in 0..nts {
                let loads = if packed { 1 } else { 2 };
                for l in 0..loads {
                    let mut addrs = [None; 32];
                    for (lane, slot) in addrs.iter_mut().enumerate() {
                        let (gq, tq) = (lane >> 2, lane & 3);
                        let (a, j, lo) = reader(gq, tq, s, nt, packed, xstride, swz)[l];
                        if j >= tokens {
                            continue; // no such token: the kernel's lane loads nothing (xa = ~0u)
                        }
                        assert_eq!(
                            mem.get(&a),
                            Some(&(j, 4 * s + tq, lo)),
                            "lane {lane} step {s} load {l}"
                        );
                        *slot = Some(a);
                    }
                    let (w, m) = wavefronts(&addrs);
                    waves += w;
                    min += m;
                }
            }
        }
        (waves, min)
    }

    #[test]
    fn consumers_read_back_the_loaders_fragments_without_two_row_bank_conflicts() {
        // K chunk widths (floats) as the kernel picks them: whole rows of 4096 or 2048, or chunks of 1024.
        for xstride in [1024, 2048, 4096] {
            for tokens in [1, 2, 3, 4, 5, 8, 9, 16] {
                let (with, min) = check(tokens, xstride, true);
                let (without, _) = check(tokens, xstride, false);
                assert_eq!(
                    with, min,
                    "T = {tokens}, stride {xstride}: conflict-free with the swizzle"
                );
                if tokens >= 2 {
                    // Without it, a phase's two rows share banks.
                    assert!(
                        without > with,
                        "T = {tokens}, stride {xstride}: {without} vs {with}"
                    );
                }
                if tokens.is_multiple_of(8) {
                    assert_eq!(
                        without,
                        2 * with,
                        "T = {tokens}, stride {xstride}: every phase two-way"
                    );
                }
            }
        }
    }

    #[test]
    fn the_emulated_layout_is_the_kernels() {
        let src = include_str!("../cuda/megakernel.cu");
        assert!(src.contains(&format!("#define MK_XSWZ {}", XSWZ as i32)));
        assert!(src.contains("16u * ((unsigned int)j & 1u)"));
        assert!(src.contains("lds128((xa[rt][nt] + 4u * kk) ^ 16u)"));
    }
}
