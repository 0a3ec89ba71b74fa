//! Long recordings in overlapping windows, cut and stitched as transformers' ASR pipeline does
//! (`chunk_length_s`, `stride_length_s`): attention costs grow with the square of an input's
//! length and the feature encoder's activations with its length, so an hour of audio cannot go
//! through the model in one pass. Each window carries some context on either side whose frames
//! are dropped; the kept frames of consecutive windows meet exactly, so the stitched logits have
//! one row per frame of the whole file, each computed with at least the context around it.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{ensure, Result};

use crate::data::audio::SAMPLE_RATE;
use crate::model::config::Config;

/// Where files are cut. Windows of `window` samples start every `window - left - right` samples;
/// of each window's frames the first `left / stride` and the last `right / stride` are context
/// (none at the file's ends). All four are multiples of the model's frame stride, so window
/// frames fall on the file's own frame grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    pub window: usize,
    pub left: usize,
    pub right: usize,
    /// Files of at most this many samples run whole.
    pub whole_up_to: usize,
    /// Samples per output frame.
    stride: usize,
}

/// Window length when long files are cut without being asked to ([`Chunking::past_limit`]).
pub const AUTO_WINDOW_SECONDS: f64 = 30.0;

/// One window of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub samples: Range<usize>,
    /// The window's frames that belong to the file's logits.
    pub keep: Range<usize>,
    /// The file's last window.
    pub last: bool,
}

impl Window {
    /// A file run whole.
    pub fn whole(samples: usize, config: &Config) -> Window {
        Window { samples: 0..samples, keep: 0..config.frames_for(samples), last: true }
    }
}

impl Chunking {
    /// Windows of `window` seconds with `left` and `right` seconds of context, each rounded to
    /// the nearest whole frame as transformers rounds them (ties to even). Files up to one window
    /// long run whole.
    pub fn from_seconds(window: f64, left: f64, right: f64, config: &Config) -> Result<Chunking> {
        let stride = config.frame_stride();
        for (what, s) in [("window", window), ("left context", left), ("right context", right)] {
            ensure!(s.is_finite() && s >= 0.0, "chunking: the {what} must be a number of seconds, not {s}");
        }
        let samples = |s: f64| (s * SAMPLE_RATE as f64 / stride as f64).round_ties_even() as usize * stride;
        let (w, l, r) = (samples(window), samples(left), samples(right));
        // Less context than the receptive field would leave a window's edge frames short of input
        // (transformers then drops or repeats a frame at every cut).
        let least = config.receptive_field().next_multiple_of(stride);
        ensure!(
            l >= least && r >= least,
            "chunking: {left} s and {right} s of context; each side needs at least {} s (the feature encoder's receptive field, in whole frames)",
            least as f64 / SAMPLE_RATE as f64
        );
        ensure!(l + r < w, "chunking: {window} s windows must be longer than their {left} s + {right} s of context");
        Ok(Chunking { window: w, left: l, right: r, whole_up_to: w, stride })
    }

    /// The cuts that keep every forward pass within `max_samples` (a batch limit): longer files
    /// in [`AUTO_WINDOW_SECONDS`] windows (or the limit's length if shorter) with `context`
    /// seconds each side (default a sixth of the window); files within the limit whole.
    pub fn past_limit(max_samples: usize, context: Option<(f64, f64)>, config: &Config) -> Result<Chunking> {
        let window = AUTO_WINDOW_SECONDS.min(max_samples as f64 / SAMPLE_RATE as f64);
        let (left, right) = context.unwrap_or((window / 6.0, window / 6.0));
        let mut chunking = Chunking::from_seconds(window, left, right, config)?;
        chunking.whole_up_to = chunking.whole_up_to.max(max_samples);
        Ok(chunking)
    }

    /// The windows of a file of `n` samples, in order: the whole file if it is short enough.
    pub fn windows(&self, n: usize, config: &Config) -> Vec<Window> {
        if n <= self.whole_up_to {
            return vec![Window::whole(n, config)];
        }
        let step = self.window - self.left - self.right;
        let mut windows = Vec::with_capacity(n.div_ceil(step));
        let mut start = 0;
        loop {
            let end = (start + self.window).min(n);
            let last = end == n;
            let first = if start == 0 { 0 } else { self.left / self.stride };
            let to = if last { config.frames_for(end - start) } else { (self.window - self.right) / self.stride };
            windows.push(Window { samples: start..end, keep: first..to, last });
            if last {
                return windows;
            }
            start += step;
        }
    }
}

/// Joins the kept frames of each file's windows into the file's logits. Windows of one file
/// come in order; those of different files may interleave.
#[derive(Default)]
pub struct Stitcher {
    /// Files with windows still to come: the kept rows so far, and how many windows gave them.
    open: HashMap<usize, (Vec<f32>, usize)>,
}

/// A file's logits, stitched.
#[derive(Debug, PartialEq)]
pub struct Stitched {
    /// `[frames, vocab]` row-major.
    pub logits: Vec<f32>,
    /// Windows the file was cut into (1: it ran whole).
    pub windows: usize,
}

impl Stitcher {
    /// Windows of `file` taken so far, while it has more to come.
    pub fn windows_of(&self, file: usize) -> usize {
        self.open.get(&file).map_or(0, |(_, n)| *n)
    }

    /// Takes window `w` of file `file` with its logits (`[frames, vocab]` row-major); after the
    /// file's last window, gives back the file's logits.
    pub fn add(&mut self, file: usize, w: &Window, logits: &[f32], vocab: usize) -> Result<Option<Stitched>> {
        let frames = logits.len() / vocab;
        ensure!(w.keep.end <= frames, "window {:?} of input {file}: keeps frames {:?} of {frames}", w.samples, w.keep);
        let (rows, windows) = self.open.entry(file).or_default();
        rows.extend_from_slice(&logits[w.keep.start * vocab..w.keep.end * vocab]);
        *windows += 1;
        if !w.last {
            return Ok(None);
        }
        let (logits, windows) = self.open.remove(&file).expect("just added");
        Ok(Some(Stitched { logits, windows }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> Vec<Config> {
        vec![Config::preset("base").unwrap(), Config::preset("large").unwrap()]
    }

    #[test]
    fn kept_frames_tile_the_whole_file_frame_grid() {
        for config in configs() {
            let stride = config.frame_stride();
            for (window, left, right) in [(10.0, 10.0 / 6.0, 10.0 / 6.0), (4.0, 0.5, 1.0), (1.0, 0.04, 0.04), (30.0, 5.0, 5.0)] {
                let c = Chunking::from_seconds(window, left, right, &config).unwrap();
                for n in [400, 16_000, c.window, c.window + 1, c.window + 319, 3 * c.window + 7, 1_000_003, 4_800_000] {
                    let windows = c.windows(n, &config);
                    // Window frames, shifted by where the window starts, continue the file's grid.
                    let mut next = 0;
                    for w in &windows {
                        assert!(w.samples.start.is_multiple_of(stride));
                        assert!(w.keep.start < w.keep.end && w.keep.end <= config.frames_for(w.samples.len()), "{w:?}");
                        assert_eq!(w.samples.start / stride + w.keep.start, next, "n = {n}: {w:?} does not continue at frame {next}");
                        next = w.samples.start / stride + w.keep.end;
                        // Every kept frame but the file's edges has its full context in the window.
                        if w.samples.start > 0 {
                            assert!(w.keep.start * stride >= c.left);
                        }
                        if !w.last {
                            assert!(w.samples.len() - w.keep.end * stride >= c.right);
                        }
                    }
                    assert_eq!(next, config.frames_for(n), "n = {n}");
                    assert!(windows.last().unwrap().last && windows.iter().filter(|w| w.last).count() == 1);
                    if n <= c.window {
                        assert_eq!(windows, vec![Window::whole(n, &config)]);
                    }
                }
            }
        }
    }

    #[test]
    fn seconds_round_to_whole_frames_like_transformers() {
        let config = Config::preset("base").unwrap();
        // transformers: int(round(s * 16000 / 320) * 320), Python's round taking ties to even.
        let c = Chunking::from_seconds(10.0, 10.0 / 6.0, 0.25, &config).unwrap();
        assert_eq!((c.window, c.left, c.right), (160_000, 83 * 320, 12 * 320));
        assert!(Chunking::from_seconds(2.0, 0.01, 0.5, &config).is_err(), "less than the receptive field");
        assert!(Chunking::from_seconds(1.0, 0.5, 0.5, &config).is_err(), "no step between windows");
        assert!(Chunking::from_seconds(f64::NAN, 0.5, 0.5, &config).is_err());
    }

    #[test]
    fn stitching_joins_each_files_windows_in_order() {
        let w = |keep: Range<usize>, last| Window { samples: 0..0, keep, last };
        let mut s = Stitcher::default();
        // File 0 in two windows, file 1 whole between them.
        let done = |logits: Vec<f32>, windows| Some(Stitched { logits, windows });
        assert_eq!(s.add(0, &w(0..2, false), &[1., 2., 3., 4., 5., 6.], 2).unwrap(), None);
        assert_eq!(s.add(1, &w(0..1, true), &[9., 9.], 2).unwrap(), done(vec![9., 9.], 1));
        assert_eq!(s.add(0, &w(1..3, true), &[0., 0., 7., 8., 5., 6.], 2).unwrap(), done(vec![1., 2., 3., 4., 7., 8., 5., 6.], 2));
        assert!(s.add(2, &w(0..4, true), &[0.; 6], 2).is_err());
    }
}
