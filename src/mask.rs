//! Binary weight masks packed 1 bit per weight: 8 weights per byte, least significant bit first,
//! over the row-major `[out, in]` weight. The on-disk and on-device format of every mask.

/// Packs keep-flags into bits; a partial last byte has zero high bits.
pub fn pack(keep: &[bool]) -> Vec<u8> {
    keep.chunks(8).map(|c| c.iter().enumerate().fold(0u8, |b, (i, &k)| b | ((k as u8) << i))).collect()
}

/// The first `n` flags of packed `bits`.
pub fn unpack(bits: &[u8], n: usize) -> Vec<bool> {
    (0..n).map(|i| (bits[i / 8] >> (i % 8)) & 1 == 1).collect()
}

/// `W * M`: the weights where `keep` is set, zero elsewhere.
pub fn apply(weights: &[f32], keep: &[bool]) -> Vec<f32> {
    weights.iter().zip(keep).map(|(&w, &k)| if k { w } else { 0.0 }).collect()
}

/// `W * M` straight from packed bits (the per-call masking of the CPU's masked linears), 8
/// weights per byte, in parallel.
pub fn apply_bits(weights: &[f32], bits: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = weights.to_vec();
    out.par_chunks_mut(8).zip(bits.par_iter()).for_each(|(w, &b)| {
        w.iter_mut().enumerate().filter(|(i, _)| (b >> i) & 1 == 0).for_each(|(_, v)| *v = 0.0);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applying_bits_equals_applying_unpacked_flags() {
        let w: Vec<f32> = (0..21).map(|i| i as f32 + 0.5).collect();
        let keep: Vec<bool> = (0..21).map(|i| i % 3 != 1).collect();
        assert_eq!(apply_bits(&w, &pack(&keep)), apply(&w, &keep));
    }

    #[test]
    fn lsb_first_layout_and_round_trip() {
        let keep = [true, false, false, false, false, false, false, true, true, true, false];
        let bits = pack(&keep);
        assert_eq!(bits, vec![0b1000_0001, 0b0000_0011]);
        assert_eq!(unpack(&bits, keep.len()), keep);
    }
}
