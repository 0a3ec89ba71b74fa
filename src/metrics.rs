//! Error rates: WER (words), CER (characters) and UER (label units, i.e. PER for phonemes), with
//! substitution / deletion / insertion counts, aggregated over a set the way sclite and ESPnet
//! report them (`Snt Wrd Corr Sub Del Ins Err S.Err`), and per-utterance alignments on request.

use unicode_normalization::UnicodeNormalization;

/// One step of a minimum-edit alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    Match,
    Sub,
    /// A reference token missing from the hypothesis.
    Del,
    /// A hypothesis token not in the reference.
    Ins,
}

/// Edit counts of one or more utterances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Utterances counted.
    pub sentences: usize,
    /// Utterances with at least one error.
    pub sentence_errors: usize,
    pub hits: usize,
    pub sub: usize,
    pub del: usize,
    pub ins: usize,
}

impl Counts {
    /// Reference length: hits + substitutions + deletions.
    pub fn ref_len(&self) -> usize {
        self.hits + self.sub + self.del
    }

    pub fn errors(&self) -> usize {
        self.sub + self.del + self.ins
    }

    /// Errors over reference length (0 for an empty reference without errors; infinity with).
    pub fn rate(&self) -> f64 {
        match (self.errors(), self.ref_len()) {
            (0, _) => 0.0,
            (_, 0) => f64::INFINITY,
            (e, n) => e as f64 / n as f64,
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.sentences += other.sentences;
        self.sentence_errors += other.sentence_errors;
        self.hits += other.hits;
        self.sub += other.sub;
        self.del += other.del;
        self.ins += other.ins;
    }

    /// An sclite-style row: `| Snt | Wrd | Corr | Sub | Del | Ins | Err | S.Err |` in percent of
    /// the reference length (S.Err in percent of sentences).
    pub fn sclite_row(&self, name: &str) -> String {
        let n = self.ref_len().max(1) as f64;
        let pct = |x: usize| 100.0 * x as f64 / n;
        format!(
            "| {name} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.sentences,
            self.ref_len(),
            pct(self.hits),
            pct(self.sub),
            pct(self.del),
            pct(self.ins),
            pct(self.errors()),
            100.0 * self.sentence_errors as f64 / self.sentences.max(1) as f64
        )
    }

    pub fn sclite_header() -> &'static str {
        "| dataset | Snt | Wrd | Corr | Sub | Del | Ins | Err | S.Err |\n|---|---|---|---|---|---|---|---|---|"
    }
}

/// Minimum-edit alignment of `hyp` against `reference` (Levenshtein, unit costs). Among equal-
/// cost alignments the backtrace prefers match/substitution, then deletion, then insertion.
pub fn align<T: PartialEq>(reference: &[T], hyp: &[T]) -> (Counts, Vec<Edit>) {
    let (n, m) = (reference.len(), hyp.len());
    let w = m + 1;
    let mut d = vec![0u32; (n + 1) * w];
    for i in 0..=n {
        d[i * w] = i as u32;
    }
    d[..w].iter_mut().enumerate().for_each(|(j, v)| *v = j as u32);
    for i in 1..=n {
        for j in 1..=m {
            let diag = d[(i - 1) * w + j - 1] + (reference[i - 1] != hyp[j - 1]) as u32;
            d[i * w + j] = diag.min(d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1);
        }
    }
    let (mut i, mut j) = (n, m);
    let mut edits = Vec::with_capacity(n.max(m));
    while i > 0 || j > 0 {
        let here = d[i * w + j];
        if i > 0 && j > 0 && here == d[(i - 1) * w + j - 1] + (reference[i - 1] != hyp[j - 1]) as u32 {
            edits.push(if reference[i - 1] == hyp[j - 1] { Edit::Match } else { Edit::Sub });
            i -= 1;
            j -= 1;
        } else if i > 0 && here == d[(i - 1) * w + j] + 1 {
            edits.push(Edit::Del);
            i -= 1;
        } else {
            edits.push(Edit::Ins);
            j -= 1;
        }
    }
    edits.reverse();
    let mut c = Counts { sentences: 1, ..Counts::default() };
    for e in &edits {
        match e {
            Edit::Match => c.hits += 1,
            Edit::Sub => c.sub += 1,
            Edit::Del => c.del += 1,
            Edit::Ins => c.ins += 1,
        }
    }
    c.sentence_errors = (c.errors() > 0) as usize;
    (c, edits)
}

/// How transcripts are normalised before scoring.
#[derive(Clone, Debug, Default)]
pub struct TextNorm {
    /// Lower-case both sides.
    pub lowercase: bool,
    /// Characters removed before scoring (punctuation users ignore, e.g. `,.?!;:"`).
    pub ignore: String,
}

impl TextNorm {
    /// NFC, optional lower-casing, ignored characters removed, whitespace collapsed.
    pub fn apply(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let cased = if self.lowercase { nfc.to_lowercase() } else { nfc };
        let kept: String = cased.chars().filter(|c| !self.ignore.contains(*c)).collect();
        kept.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Word and character counts of one utterance after normalisation. Characters include the
/// spaces between words, as jiwer and sclite count them.
pub fn word_and_char_counts(reference: &str, hyp: &str, norm: &TextNorm) -> (Counts, Counts) {
    let (r, h) = (norm.apply(reference), norm.apply(hyp));
    let words = align(&r.split_whitespace().collect::<Vec<_>>(), &h.split_whitespace().collect::<Vec<_>>()).0;
    let chars = align(&r.chars().collect::<Vec<_>>(), &h.chars().collect::<Vec<_>>()).0;
    (words, chars)
}

/// The alignment as two padded lines, sclite style (`***` for gaps, mismatches upper-cased).
pub fn render_alignment(reference: &[&str], hyp: &[&str], edits: &[Edit]) -> (String, String) {
    let (mut i, mut j) = (0, 0);
    let (mut top, mut bottom) = (Vec::new(), Vec::new());
    for e in edits {
        let (r, h) = match e {
            Edit::Match => (reference[i].to_string(), hyp[j].to_string()),
            Edit::Sub => (reference[i].to_uppercase(), hyp[j].to_uppercase()),
            Edit::Del => (reference[i].to_uppercase(), "***".into()),
            Edit::Ins => ("***".into(), hyp[j].to_uppercase()),
        };
        i += (*e != Edit::Ins) as usize;
        j += (*e != Edit::Del) as usize;
        let width = r.chars().count().max(h.chars().count());
        top.push(format!("{r:width$}"));
        bottom.push(format!("{h:width$}"));
    }
    (format!("REF: {}", top.join(" ")), format!("HYP: {}", bottom.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    #[test]
    fn hand_worked_word_alignment() {
        // the cat sat on the mat -> the cat sit on mat: 1 substitution, 1 deletion, 4 hits.
        let (c, edits) = align(&words("the cat sat on the mat"), &words("the cat sit on mat"));
        assert_eq!((c.hits, c.sub, c.del, c.ins), (4, 1, 1, 0));
        assert_eq!(edits.len(), 6);
        assert!((c.rate() - 2.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn unit_error_rate_over_label_ids() {
        // PER over phoneme ids: one deletion and one insertion against five reference units.
        let (c, _) = align(&[3u32, 7, 7, 1, 4], &[3, 7, 1, 4, 9]);
        assert_eq!((c.hits, c.sub, c.del, c.ins), (4, 0, 1, 1));
        assert!((c.rate() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn empty_sides() {
        let (c, _) = align::<&str>(&[], &words("a b"));
        assert_eq!((c.ins, c.ref_len()), (2, 0));
        assert_eq!(c.rate(), f64::INFINITY);
        let (c, _) = align(&words("a b"), &[]);
        assert_eq!((c.del, c.rate()), (2, 1.0));
        assert_eq!(align::<u32>(&[], &[]).0.rate(), 0.0);
    }

    #[test]
    fn normalisation_folds_case_punctuation_and_unicode_forms() {
        let norm = TextNorm { lowercase: true, ignore: ",.?".into() };
        // "é" precomposed vs e + combining acute: equal after NFC.
        assert_eq!(norm.apply("Caf\u{e9}, OK?"), norm.apply("cafe\u{301} ok"));
    }

    #[test]
    fn sclite_row_in_percent() {
        let mut total = Counts::default();
        total.add(&align(&words("a b c d"), &words("a x c")).0);
        total.add(&align(&words("e f"), &words("e f")).0);
        assert_eq!(total.sclite_row("test"), "| test | 2 | 6 | 66.7 | 16.7 | 16.7 | 0.0 | 33.3 | 50.0 |");
    }

    #[test]
    fn rendered_alignment_marks_gaps() {
        for (r, h, top, bottom) in [("a b c", "a c", "REF: a B   c", "HYP: a *** c"), ("a c", "a bb c", "REF: a *** c", "HYP: a BB  c")] {
            let (r, h) = (words(r), words(h));
            let (_, edits) = align(&r, &h);
            assert_eq!(render_alignment(&r, &h, &edits), (top.to_string(), bottom.to_string()));
        }
    }
}
