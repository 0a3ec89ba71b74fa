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
use crate::infer::{decoded_batches, BatchLimits, Recognizer, Stitcher};
use crate::metrics::{align, Counts};
use crate::model::vocab::Vocab;
use crate::tensor::Tensor;

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
    /// Utterances recognised in windows, their logits stitched (long ones; see
    /// [`crate::infer::Chunking`]).
    pub windowed: usize,
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
/// with (utterances done, total) after each batch. Utterances run whole, as references are
/// scored, unless the recogniser cuts long ones into windows (`rec.decoding.chunking`): their
/// loss and hypothesis then come from the stitched logits.
pub fn evaluate(
    rec: &Recognizer,
    data: &Dataset,
    labels: &Labels,
    limits: BatchLimits,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let paths: Vec<_> = data.utterances.iter().map(|u| u.audio.clone()).collect();
    let total = paths.len();
    let vocab = rec.vocab.len();
    let mut report = EvalReport { decoder: rec.decoding.decoder, ..EvalReport::default() };
    let mut loss_sum = 0.0f64;
    let mut stitcher = Stitcher::default();
    for batch in decoded_batches(paths, rec.pre, &rec.model.config, rec.decoding.chunking, limits) {
        let batch = batch?;
        let inputs: Vec<&[f32]> = batch.iter().map(|p| p.samples.as_slice()).collect();
        let (logits, seqs) = rec.model.logits(rec.backend, &inputs, None)?;
        if batch.iter().all(|p| p.windows == 1) {
            let files: Vec<(usize, usize)> = batch.iter().map(|p| (p.index, 1)).collect();
            let host = rec.backend.to_host(&logits)?.to_vec()?;
            loss_sum += score_files(rec, &files, (&logits, &host), &seqs, labels, &mut report)?;
        } else {
            // Windows: stitch on the host, score the files this batch finished.
            let host = rec.backend.to_host(&logits)?.to_vec()?;
            let (mut files, mut rows, mut frames) = (Vec::new(), Vec::new(), Vec::new());
            for (u, piece) in batch.iter().enumerate() {
                let r = seqs.range(u);
                if let Some(done) = stitcher.add(piece.index, &piece.window, &host[r.start * vocab..r.end * vocab], vocab)? {
                    files.push((piece.index, done.windows));
                    frames.push(done.logits.len() / vocab);
                    rows.extend(done.logits);
                }
            }
            if files.is_empty() {
                continue;
            }
            let stitched = Tensor::from_vec(rows, &[frames.iter().sum(), vocab]);
            let logits = rec.backend.upload(&stitched)?;
            loss_sum += score_files(rec, &files, (&logits, stitched.f32s()?), &Seqs::new(frames), labels, &mut report)?;
        }
        progress(report.utterances, total);
    }
    report.loss = loss_sum / report.utterances.max(1) as f64;
    Ok(report)
}

/// Scores whole utterances `files` ((index in the dataset, windows it ran in)) from their
/// logits `[frames, vocab]` packed by `seqs`, on the recogniser's backend and their host copy
/// (the loss runs on the backend, decoding on the host); returns their summed CTC loss.
fn score_files(
    rec: &Recognizer,
    files: &[(usize, usize)],
    (logits, host): (&Tensor, &[f32]),
    seqs: &Seqs,
    labels: &Labels,
    report: &mut EvalReport,
) -> Result<f64> {
    let (vocab, blank, delimiter) = (rec.vocab.len(), rec.vocab.blank(), rec.vocab.id(DELIMITER));
    let refs: Vec<Vec<u32>> = files.iter().map(|&(i, _)| labels.tokens[i].clone()).collect();
    report.infeasible += refs.iter().zip(seqs.lens()).filter(|(r, &n)| min_frames(r) > n).count();
    let targets = CtcTargets { labels: refs, blank, zero_infinity: true };
    let losses = ctc_loss(rec.backend, logits, seqs, &targets, Reduction::Sum)?.losses;
    let decoded = rec.decoding.decoder.decode_batch(host, seqs, vocab, blank);
    for (((&(index, windows), reference), ids), &loss) in files.iter().zip(&targets.labels).zip(decoded).zip(&losses) {
        let hypothesis = canonical(ids.into_iter().filter(|&i| rec.vocab.is_content(i)).collect(), delimiter);
        let (wer, cer, uer) = score(reference, &hypothesis, delimiter);
        report.wer.add(&wer);
        report.cer.add(&cer);
        report.uer.add(&uer);
        report.windowed += (windows > 1) as usize;
        report.scored.push(Scored { index, hypothesis, loss, wer, cer, uer });
    }
    report.utterances += files.len();
    Ok(losses.iter().map(|&l| l as f64).sum())
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

    /// One JSON object: `decoder` ("greedy" or "beam N"), `utterances`, `infeasible`,
    /// `windowed`, `loss`, `wer`, `cer`, `uer` (fractions), and for each rate `<rate>_sub`, `<rate>_del`, `<rate>_ins`,
    /// `<rate>_ref_len`.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("decoder".into(), self.decoder.name().into());
        m.insert("utterances".into(), self.utterances.into());
        m.insert("infeasible".into(), self.infeasible.into());
        m.insert("windowed".into(), self.windowed.into());
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
