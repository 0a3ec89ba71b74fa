//! Many masks over one model: each task (a language, a downstream task) is a mask set over the
//! same frozen weights, with its own head and vocabulary. The weights load once; each task adds
//! its packed masks (1 bit per masked weight) and a head, and a batch may mix tasks: the masked
//! linears run per task segment of the batch ([`crate::backend::Backend::linear_segments`]),
//! everything else once for the whole batch.

use anyhow::Result;

use super::masks::MaskSet;
use super::wav2vec2::maskable_shape;
use super::Wav2Vec2;
use crate::backend::{Backend, LinearMask, Seqs};
use crate::train::masked::Part;

/// One task's masks, per encoder layer and linear (qkv stacked, out, intermediate, output).
pub struct TaskMasks {
    layers: Vec<[Option<LinearMask>; 4]>,
    /// Packed mask bytes held.
    pub bytes: usize,
}

/// Where each [`Part`] sits among a layer's four linears.
fn slot(part: Part) -> usize {
    match part {
        Part::Query | Part::Key | Part::Value => 0,
        Part::Out => 1,
        Part::Intermediate => 2,
        Part::Output => 3,
    }
}

impl TaskMasks {
    /// The masks of `set` over `model`, ready for `be`. q, k and v masks are stacked like their
    /// weights; a part of a stacked linear without a mask keeps all its weights.
    pub fn prepare(set: &MaskSet, model: &Wav2Vec2, be: &dyn Backend) -> Result<TaskMasks> {
        let c = &model.config;
        set.check(|name| maskable_shape(c, name))?;
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut bytes = 0;
        let parts = [Part::Query, Part::Key, Part::Value, Part::Out, Part::Intermediate, Part::Output];
        for (i, layer) in model.layers.iter().enumerate() {
            let mut slots: [Option<Vec<bool>>; 4] = Default::default();
            for part in parts {
                let Some((shape, bits)) = set.masks.get(&part.weight_name(i)) else { continue };
                let (lin, row0) = part.linear(layer);
                // Output features from the bias: the weight's layout depends on the backend.
                let stacked = lin.bias.numel();
                let d_in = lin.weight.numel() / stacked;
                let keep = slots[slot(part)].get_or_insert_with(|| vec![true; stacked * d_in]);
                let numel: usize = shape.iter().product();
                keep[row0 * d_in..row0 * d_in + numel].copy_from_slice(&crate::mask::unpack(bits, numel));
            }
            let mut prepared: [Option<LinearMask>; 4] = Default::default();
            for (k, keep) in slots.into_iter().enumerate() {
                if let Some(keep) = keep {
                    let bits = crate::mask::pack(&keep);
                    bytes += bits.len();
                    let d_out = [&layer.qkv_proj, &layer.out_proj, &layer.intermediate_dense, &layer.output_dense][k].bias.numel();
                    prepared[k] = Some(be.prepare_mask(&bits, d_out, keep.len() / d_out)?);
                }
            }
            layers.push(prepared);
        }
        Ok(TaskMasks { layers, bytes })
    }
}

/// The task of every utterance of a batch.
pub struct Routing<'a> {
    pub tasks: Vec<&'a TaskMasks>,
}

impl<'a> Routing<'a> {
    /// `(frames, mask)` segments of consecutive utterances sharing a task for linear `slot` of
    /// layer `layer`; `None` when no task masks it (the plain product serves everyone).
    pub fn segments(&self, seqs: &Seqs, layer: usize, slot: usize) -> Option<Vec<(usize, Option<&'a LinearMask>)>> {
        let mask = |t: &'a TaskMasks| t.layers.get(layer).and_then(|l| l[slot].as_ref());
        if self.tasks.iter().all(|t| mask(t).is_none()) {
            return None;
        }
        let mut segments: Vec<(usize, Option<&'a LinearMask>)> = Vec::new();
        for (u, t) in self.tasks.iter().enumerate() {
            let m = mask(t);
            match segments.last_mut() {
                Some((frames, last)) if same(*last, m) => *frames += seqs.lens()[u],
                _ => segments.push((seqs.lens()[u], m)),
            }
        }
        Some(segments)
    }
}

fn same(a: Option<&LinearMask>, b: Option<&LinearMask>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}
