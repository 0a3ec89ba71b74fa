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
use crate::model::vocab::Vocab;

/// One utterance as scored.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Position in the dataset.
    pub index: usize,
    /// The decoded tokens as compared: content only, delimiters tidied.
    pub hypothesis: Vec<u32>,
    /// CTC loss summed over frames.
    pub loss: f32,
    pub wer: Counts,
    pub cer: Counts,
    pub uer: Counts,
}

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
    /// Every utterance, in dataset order.
    pub scored: Vec<Scored>,
}

/// One utterance's comparison under the three rates: (WER, CER, UER) counts.
fn score(reference: &[u32], hyp: &[u32], delimiter: Option<u32>) -> (Counts, Counts, Counts) {
    let cer = align(reference, hyp).0;
    let units = |t: &[u32]| t.iter().copied().filter(|&i| Some(i) != delimiter).collect::<Vec<_>>();
    let uer = align(&units(reference), &units(hyp)).0;
    let words = |t: &[u32]| -> Vec<Vec<u32>> {
        match delimiter {
            Some(d) => t.split(|&i| i == d).filter(|w| !w.is_empty()).map(<[u32]>::to_vec).collect(),
            None => vec![t.to_vec()],
        }
    };
    (align(&words(reference), &words(hyp)).0, cer, uer)
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
    let mut report = EvalReport { decoder: rec.decoding.decoder, ..EvalReport::default() };
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
        let decoded = rec.decoding.decoder.decode_batch(&host, &seqs, vocab, rec.vocab.blank());
        for (((piece, reference), ids), &loss) in batch.iter().zip(&targets.labels).zip(decoded).zip(&losses) {
            let hypothesis = canonical(ids.into_iter().filter(|&i| rec.vocab.is_content(i)).collect(), delimiter);
            let (wer, cer, uer) = score(reference, &hypothesis, delimiter);
            report.wer.add(&wer);
            report.cer.add(&cer);
            report.uer.add(&uer);
            report.scored.push(Scored { index: piece.index, hypothesis, loss, wer, cer, uer });
        }
        report.utterances += batch.len();
        progress(report.utterances, total);
    }
    report.loss = loss_sum / report.utterances.max(1) as f64;
    Ok(report)
}

impl EvalReport {
    /// One JSON line per utterance, in dataset order: `audio`, `reference` and `hypothesis` (the
    /// token sequences compared, as text), `loss`, and for each rate `<rate>_errors` and
    /// `<rate>_ref_len`, whose sums over the lines give the report's rates.
    pub fn predictions(&self, data: &Dataset, labels: &Labels, vocab: &Vocab) -> String {
        let mut out = String::new();
        for s in &self.scored {
            let mut m = serde_json::Map::new();
            m.insert("audio".into(), data.utterances[s.index].audio.display().to_string().into());
            m.insert("reference".into(), vocab.text(&labels.tokens[s.index]).into());
            m.insert("hypothesis".into(), vocab.text(&s.hypothesis).into());
            m.insert("loss".into(), s.loss.into());
            for (name, c) in [("wer", &s.wer), ("cer", &s.cer), ("uer", &s.uer)] {
                m.insert(format!("{name}_errors"), c.errors().into());
                m.insert(format!("{name}_ref_len"), c.ref_len().into());
            }
            out.push_str(&serde_json::Value::Object(m).to_string());
            out.push('\n');
        }
        out
    }

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
        let (wer, cer, uer) = score(&[2, 3, 1, 4], &[2, 1, 4, 5], Some(1));
        assert_eq!((cer.hits, cer.del, cer.ins, cer.sub), (3, 1, 1, 0));
        // Units [2 3 4] vs [2 4 5]: two edits either way (a tie between alignments).
        assert_eq!((uer.errors(), uer.ref_len()), (2, 3));
        // Words [2 3] [4] vs [2] [4 5]: two substitutions.
        assert_eq!((wer.sub, wer.ref_len()), (2, 2));
    }
}
