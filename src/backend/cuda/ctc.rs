//! CTC loss and gradient on the GPU (kernels/ctc.cu): the per-batch index arrays in one upload,
//! then three launches (each frame's log-sum-exp, the alpha and beta recursions side by side,
//! the gradient).

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{DevicePtr, DeviceRepr, PushKernelArg};

use super::launch::config;
use super::CudaBackend;
use crate::backend::{Backend, Seqs};
use crate::ctc::CtcTargets;
use crate::tensor::{DType, Tensor};

/// Extended-label states one recursion block holds: up to 4 per thread (`ctc_recursions_s4` in
/// kernels/ctc.cu), 1024 threads, so transcripts of up to 2047 labels.
const MAX_STATES: usize = 4 * 1024;

/// The recursion kernel for sequences of up to `longest` states, and its threads per block: one
/// state per thread while a block holds them all, then 2 and 4 (each kernel keeps the same
/// registers of emissions in flight, over fewer frames).
fn recursion_kernel(longest: usize) -> (&'static str, usize) {
    let (name, slots) = match longest.div_ceil(1024) {
        1 => ("ctc_recursions_s1", 1),
        2 => ("ctc_recursions_s2", 2),
        _ => ("ctc_recursions_s4", 4),
    };
    (name, longest.div_ceil(slots).div_ceil(32) * 32)
}

/// Frames per block of the per-frame kernels (one warp each).
const FRAMES_PER_BLOCK: usize = 8;

/// `struct CtcMeta` in kernels/ctc.cu (same layout): device addresses of the index arrays.
#[repr(C)]
#[derive(Clone, Copy)]
struct CtcMeta {
    frame_off: u64,
    label_off: u64,
    state_off: u64,
    labels: u64,
    tok_off: u64,
    positions: u64,
    vocab: i32,
    blank: i32,
}

// SAFETY: plain-old-data with the C layout the kernels expect.
unsafe impl DeviceRepr for CtcMeta {}

/// The index arrays of a batch, concatenated (one upload), with each one's start.
struct Indices {
    data: Vec<i64>,
    /// Starts of frame_off, label_off, state_off, labels, tok_off, positions in `data`.
    starts: [usize; 6],
}

/// `tok_off` and `positions` for one utterance: the label indices holding each token, in order
/// (a counting sort by token).
fn token_positions(labels: &[u32], vocab: usize, tok_off: &mut Vec<i64>, positions: &mut Vec<i64>) {
    let mut start = vec![0usize; vocab + 1];
    for &k in labels {
        start[k as usize + 1] += 1;
    }
    for k in 0..vocab {
        start[k + 1] += start[k];
    }
    let base = positions.len();
    tok_off.extend(start.iter().map(|&s| (base + s) as i64));
    positions.resize(base + labels.len(), 0);
    let mut next = start;
    for (j, &k) in labels.iter().enumerate() {
        positions[base + next[k as usize]] = j as i64;
        next[k as usize] += 1;
    }
}

fn indices(seqs: &Seqs, targets: &CtcTargets, vocab: usize) -> Indices {
    let (mut label_off, mut state_off, mut labels) = (vec![0i64], vec![0i64], Vec::new());
    let (mut tok_off, mut positions) = (Vec::new(), Vec::new());
    for (l, &frames) in targets.labels.iter().zip(seqs.lens()) {
        labels.extend(l.iter().map(|&k| k as i64));
        label_off.push(labels.len() as i64);
        state_off.push(state_off.last().copied().unwrap_or(0) + (frames * (2 * l.len() + 1)) as i64);
        token_positions(l, vocab, &mut tok_off, &mut positions);
    }
    let frame_off: Vec<i64> = seqs.offsets().iter().map(|&o| o as i64).collect();
    let parts = [frame_off, label_off, state_off, labels, tok_off, positions];
    let mut starts = [0usize; 6];
    let mut data = Vec::new();
    for (start, part) in starts.iter_mut().zip(parts) {
        *start = data.len();
        data.extend(part);
    }
    Indices { data, starts }
}

impl CudaBackend {
    /// [`Backend::ctc_loss`] on the device.
    pub(super) fn ctc(&self, logits: &Tensor, seqs: &Seqs, targets: &CtcTargets, grad_scale: f32) -> Result<(Vec<f32>, Tensor)> {
        Self::expect_dtype(logits, DType::F32, "CTC logits")?;
        let vocab = *logits.shape().last().unwrap_or(&0);
        ensure!(targets.labels.len() == seqs.count(), "CTC: {} label sequences for {} utterances", targets.labels.len(), seqs.count());
        let longest = targets.labels.iter().map(|l| 2 * l.len() + 1).max().unwrap_or(1);
        if longest > MAX_STATES {
            bail!(
                "CTC on the GPU takes transcripts of up to {} labels, and one here has {} (split the utterance, or train on the CPU)",
                (MAX_STATES - 1) / 2,
                (longest - 1) / 2
            );
        }
        let longest_frames = seqs.lens().iter().copied().max().unwrap_or(0);
        if longest_frames == 0 {
            // No frames at all (or no utterances): nothing to align, nothing to upload.
            return Ok((vec![0.0; seqs.count()], self.empty(logits.shape(), DType::F32)?));
        }
        let index = indices(seqs, targets, vocab);
        let meta_buf = self.stream.clone_htod(&index.data).map_err(|e| anyhow!("CUDA copy: {e}"))?;
        let base = meta_buf.device_ptr(&self.stream).0;
        let at = |i: usize| base + 8 * index.starts[i] as u64;
        let meta = CtcMeta {
            frame_off: at(0),
            label_off: at(1),
            state_off: at(2),
            labels: at(3),
            tok_off: at(4),
            positions: at(5),
            vocab: vocab as i32,
            blank: targets.blank as i32,
        };
        let states = (index.data[index.starts[3] - 1] as usize).max(1); // state_off's last entry
        let lse = self.empty(&[seqs.total().max(1)], DType::F32)?;
        let alpha_offsets = self.empty(&[seqs.total().max(1)], DType::F32)?;
        let beta_offsets = self.empty(&[seqs.total().max(1)], DType::F32)?;
        let alpha = self.empty(&[states], DType::F32)?;
        let beta = self.empty(&[states], DType::F32)?;
        let grad = self.empty(logits.shape(), DType::F32)?;
        let losses = self.empty(&[seqs.count().max(1)], DType::F32)?;
        let (pl, plse, pao, pbo, pa, pb, pg, ploss) = (
            self.ptr(logits)?,
            self.ptr(&lse)?,
            self.ptr(&alpha_offsets)?,
            self.ptr(&beta_offsets)?,
            self.ptr(&alpha)?,
            self.ptr(&beta)?,
            self.ptr(&grad)?,
            self.ptr(&losses)?,
        );
        let zero_inf = targets.zero_infinity as i32;
        let utterances = seqs.count() as u32;
        let launch = self.launcher();
        let (frames, vocab_i32) = (seqs.total() as i32, vocab as i32);
        let every_frame = config((seqs.total().div_ceil(FRAMES_PER_BLOCK) as u32, 1, 1), 32 * FRAMES_PER_BLOCK as u32);
        launch.launch(self.func("ctc_lse"), every_frame, |b| {
            b.arg(&pl).arg(&frames).arg(&vocab_i32).arg(&plse);
        })?;
        let (kernel, threads) = recursion_kernel(longest);
        let mut both = config((2, utterances, 1), threads as u32);
        both.shared_mem_bytes = ((2 * longest + threads / 32) * 4) as u32; // two frames, a peak per warp
        launch.launch(self.func(kernel), both, |b| {
            b.arg(&pl).arg(&plse).arg(&meta).arg(&pa).arg(&pb).arg(&pao).arg(&pbo).arg(&zero_inf).arg(&ploss);
        })?;
        let per_frame = config((longest_frames.div_ceil(FRAMES_PER_BLOCK) as u32, utterances, 1), 32 * FRAMES_PER_BLOCK as u32);
        launch.launch(self.func("ctc_grad"), per_frame, |b| {
            b.arg(&pl).arg(&meta).arg(&plse).arg(&pa).arg(&pb).arg(&pao).arg(&pbo).arg(&zero_inf).arg(&grad_scale).arg(&pg);
        })?;
        let losses = self.to_host(&losses)?.to_vec()?[..seqs.count()].to_vec();
        if let Some(u) = losses.iter().position(|l| l.is_infinite()) {
            bail!("utterance {u}: no CTC alignment of its {} labels fits its {} frames", targets.labels[u].len(), seqs.lens()[u]);
        }
        Ok((losses, grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_a_thread_and_blocks_stay_within_1024_threads() {
        for longest in [1, 31, 33, 441, 1023, 1024, 1025, 2047, 2048, 2049, 3000, MAX_STATES - 1] {
            let (name, threads) = recursion_kernel(longest);
            let slots: usize = name.rsplit('s').next().unwrap().parse().unwrap();
            assert!(threads * slots >= longest && threads <= 1024 && threads % 32 == 0, "{longest} states: {name} x {threads}");
            assert!(slots == 1 || longest > 1024 * (slots / 2), "{longest} states: {name} has more slots than needed");
        }
    }

    #[test]
    fn the_index_arrays_lie_end_to_end_with_their_starts() {
        let targets = CtcTargets { labels: vec![vec![1, 2], vec![], vec![2]], blank: 0, zero_infinity: false };
        let ix = indices(&Seqs::new(vec![5, 3, 4]), &targets, 3);
        let part = |i: usize| ix.data[ix.starts[i]..ix.starts.get(i + 1).copied().unwrap_or(ix.data.len())].to_vec();
        assert_eq!(part(0), vec![0, 5, 8, 12], "frame offsets");
        assert_eq!(part(1), vec![0, 2, 2, 3], "label offsets");
        assert_eq!(part(2), vec![0, 25, 28, 40], "state offsets: frames x (2S + 1)");
        assert_eq!(part(3), vec![1, 2, 2], "labels");
        assert_eq!(part(4), vec![0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3], "per utterance and token: where its positions start");
        assert_eq!(part(5), vec![0, 1, 0], "label indices of each token");
    }

    #[test]
    fn token_positions_list_each_tokens_label_indices_in_order() {
        let (mut tok_off, mut positions) = (vec![], vec![7]); // an earlier utterance's entry
        token_positions(&[2, 1, 2, 3, 2], 4, &mut tok_off, &mut positions);
        assert_eq!(tok_off, vec![1, 1, 2, 5, 6]);
        assert_eq!(positions, vec![7, 1, 0, 2, 4, 3]);
    }
}
