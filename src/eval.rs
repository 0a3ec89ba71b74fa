//! Scoring a model on a dataset: greedy or beam-search decoding, mean per-utterance CTC loss, and
//! WER / CER / UER over the vocabulary's tokens.
//!
//! All three rates compare token sequences, blanks and special tokens removed:
//! - CER: every token, the word delimiter `|` included (characters with spaces, for character
//!   vocabularies, as jiwer counts them);
//! - UER: every token but `|` (phoneme error rate for phoneme vocabularies);
//! - WER: words, i.e. the token runs between delimiters.

use anyhow::Result;

use crate::backend::Seqs;
use crate::ctc::loss::min_frames;
use crate::ctc::{ctc_loss, CtcTargets, Decoder, Reduction};
use crate::data::dataset::Dataset;
use crate::data::labels::{canonical, Labels, DELIMITER};
use crate::infer::{decoded_batches, BatchLimits, Recognizer};
use crate::metrics::{align, Counts};

#[derive(Debug, Default)]
pub struct EvalReport {
    pub decoder: Decoder,
    pub utterances: usize,
    /// Utterances whose reference needs more frames than the audio gives (loss counted as 0).
    pub infeasible: usize,
    /// Mean over utterances of the CTC loss summed over frames.
    pub loss: f64,
    pub wer: Counts,
    pub cer: Counts,
    pub uer: Counts,
}

/// Adds one utterance's comparison to the three rates.
fn score(reference: &[u32], hyp: &[u32], delimiter: Option<u32>, report: &mut EvalReport) {
    report.cer.add(&align(reference, hyp).0);
    let units = |t: &[u32]| t.iter().copied().filter(|&i| Some(i) != delimiter).collect::<Vec<_>>();
    report.uer.add(&align(&units(reference), &units(hyp)).0);
    let words = |t: &[u32]| -> Vec<Vec<u32>> {
        match delimiter {
            Some(d) => t.split(|&i| i == d).filter(|w| !w.is_empty()).map(<[u32]>::to_vec).collect(),
            None => vec![t.to_vec()],
        }
    };
    report.wer.add(&align(&words(reference), &words(hyp)).0);
}

/// Runs `rec` over `data` (references already tokenised into `labels`), calling `progress`
/// with (utterances done, total) after each batch.
pub fn evaluate(
    rec: &Recognizer,
    data: &Dataset,
    labels: &Labels,
    limits: BatchLimits,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let paths: Vec<_> = data.utterances.iter().map(|u| u.audio.clone()).collect();
    let total = paths.len();
    let delimiter = rec.vocab.id(DELIMITER);
    let vocab = rec.vocab.len();
    let mut report = EvalReport { decoder: rec.decoder, ..EvalReport::default() };
    let mut loss_sum = 0.0f64;
    // Whole utterances, as the references were scored.
    for batch in decoded_batches(paths, rec.pre, &rec.model.config, None, limits) {
        let batch = batch?;
        let inputs: Vec<&[f32]> = batch.iter().map(|p| p.samples.as_slice()).collect();
        let (logits, seqs): (_, Seqs) = rec.model.logits(rec.backend, &inputs, None)?;
        let refs: Vec<Vec<u32>> = batch.iter().map(|p| labels.tokens[p.index].clone()).collect();
        report.infeasible += refs.iter().zip(seqs.lens()).filter(|(r, &n)| min_frames(r) > n).count();
        let targets = CtcTargets { labels: refs, blank: rec.vocab.blank(), zero_infinity: true };
        let losses = ctc_loss(rec.backend, &logits, &seqs, &targets, Reduction::Sum)?.losses;
        loss_sum += losses.iter().map(|&l| l as f64).sum::<f64>();
        let host = rec.backend.to_host(&logits)?.to_vec()?;
        for (reference, ids) in targets.labels.iter().zip(rec.decoder.decode_batch(&host, &seqs, vocab, rec.vocab.blank())) {
            let hyp = canonical(ids.into_iter().filter(|&i| rec.vocab.is_content(i)).collect(), delimiter);
            score(reference, &hyp, delimiter, &mut report);
        }
        report.utterances += batch.len();
        progress(report.utterances, total);
    }
    report.loss = loss_sum / report.utterances.max(1) as f64;
    Ok(report)
}

impl EvalReport {
    /// One JSON object: `decoder` ("greedy" or "beam N"), `utterances`, `loss`, `wer`, `cer`,
    /// `uer` (fractions), and for each rate `<rate>_sub`, `<rate>_del`, `<rate>_ins`,
    /// `<rate>_ref_len`.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("decoder".into(), self.decoder.name().into());
        m.insert("utterances".into(), self.utterances.into());
        m.insert("infeasible".into(), self.infeasible.into());
        m.insert("loss".into(), self.loss.into());
        for (name, c) in [("wer", &self.wer), ("cer", &self.cer), ("uer", &self.uer)] {
            m.insert(name.into(), c.rate().into());
            m.insert(format!("{name}_sub"), c.sub.into());
            m.insert(format!("{name}_del"), c.del.into());
            m.insert(format!("{name}_ins"), c.ins.into());
            m.insert(format!("{name}_ref_len"), c.ref_len().into());
        }
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_split_tokens_words_and_units() {
        // Delimiter 1. Reference "2 3 | 4", hypothesis "2 | 4 5".
        let mut r = EvalReport::default();
        score(&[2, 3, 1, 4], &[2, 1, 4, 5], Some(1), &mut r);
        assert_eq!((r.cer.hits, r.cer.del, r.cer.ins, r.cer.sub), (3, 1, 1, 0));
        // Units [2 3 4] vs [2 4 5]: two edits either way (a tie between alignments).
        assert_eq!((r.uer.errors(), r.uer.ref_len()), (2, 3));
        // Words [2 3] [4] vs [2] [4 5]: two substitutions.
        assert_eq!((r.wer.sub, r.wer.ref_len()), (2, 2));
    }
}
