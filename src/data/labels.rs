//! Transcripts to token ids of a CTC vocabulary, normalised the way users expect: Unicode NFC,
//! case folded to the vocabulary's case when it has only one, ignored characters removed, spaces
//! mapped to the word delimiter `|`. Symbols the vocabulary lacks are an error listing them, or
//! dropped and counted with `skip_unknown`.

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use unicode_normalization::UnicodeNormalization;

use super::dataset::LabelKind;
use crate::model::vocab::Vocab;

/// The word delimiter token.
pub const DELIMITER: &str = "|";

/// Case folding applied before tokenising.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Upper,
    Lower,
    Mixed,
}

pub struct Labeler<'a> {
    vocab: &'a Vocab,
    kind: LabelKind,
    ignore: String,
    skip_unknown: bool,
    case: Case,
}

/// Token ids of every transcript, and how many unknown symbols were dropped.
#[derive(Debug)]
pub struct Labels {
    pub tokens: Vec<Vec<u32>>,
    pub skipped: usize,
}

impl<'a> Labeler<'a> {
    pub fn new(vocab: &'a Vocab, kind: LabelKind, ignore: &str, skip_unknown: bool) -> Labeler<'a> {
        // The vocabulary's case, from its single-letter content tokens.
        let letters: Vec<char> = vocab.tokens().iter().filter_map(|t| single_char(t)).filter(|c| c.is_alphabetic()).collect();
        let case = match (letters.iter().any(|c| c.is_uppercase()), letters.iter().any(|c| c.is_lowercase())) {
            (true, false) => Case::Upper,
            (false, true) => Case::Lower,
            _ => Case::Mixed,
        };
        // Units such as IPA phonemes are case-sensitive symbols (ʃ is not Ʃ): never folded.
        let case = if kind == LabelKind::Phn { Case::Mixed } else { case };
        Labeler { vocab, kind, ignore: ignore.to_string(), skip_unknown, case }
    }

    /// Token ids of every transcript. Unknown symbols: an error naming them (and how many
    /// utterances have them), unless `skip_unknown`.
    pub fn label_all<'t>(&self, texts: impl Iterator<Item = &'t str>) -> Result<Labels> {
        let mut tokens = Vec::new();
        let mut unknown = BTreeSet::new();
        let (mut affected, mut skipped) = (0, 0);
        for text in texts {
            let mut ids = Vec::new();
            let mut bad = false;
            for sym in symbols(text, self.kind, &self.ignore, self.case) {
                match self.vocab.id(&sym).filter(|&id| id as usize != self.vocab.blank()) {
                    Some(id) => ids.push(id),
                    None => {
                        unknown.insert(sym);
                        skipped += 1;
                        bad = true;
                    }
                }
            }
            affected += bad as usize;
            tokens.push(canonical(ids, self.vocab.id(DELIMITER)));
        }
        if !unknown.is_empty() && !self.skip_unknown {
            let list: Vec<String> = unknown.iter().take(30).map(|s| format!("{s:?}")).collect();
            bail!(
                "{affected} transcripts use {} symbols the vocabulary lacks: {}{} (map them with --chars-to-ignore, or drop them with --skip-unknown)",
                unknown.len(),
                list.join(" "),
                if unknown.len() > 30 { " ..." } else { "" }
            );
        }
        Ok(Labels { tokens, skipped })
    }
}

/// The symbols of one transcript before vocabulary lookup, `|` between words: NFC, case folded,
/// `ignore` characters removed; letters for `Wrd`, the whitespace-separated symbols otherwise.
pub fn symbols(text: &str, kind: LabelKind, ignore: &str, case: Case) -> Vec<String> {
    let text: String = text.nfc().collect();
    let text = match case {
        Case::Upper => text.to_uppercase(),
        Case::Lower => text.to_lowercase(),
        Case::Mixed => text,
    };
    let text: String = text.chars().filter(|c| !ignore.contains(*c)).collect();
    match kind {
        LabelKind::Ltr | LabelKind::Phn => text.split_whitespace().map(str::to_string).collect(),
        LabelKind::Wrd => {
            let words: Vec<&str> = text.split_whitespace().collect();
            words
                .iter()
                .enumerate()
                .flat_map(|(i, w)| (i > 0).then(|| DELIMITER.to_string()).into_iter().chain(w.chars().map(String::from)))
                .collect()
        }
    }
}

/// No leading, trailing or doubled word delimiters (also after unknown symbols were dropped).
pub fn canonical(ids: Vec<u32>, delimiter: Option<u32>) -> Vec<u32> {
    let Some(d) = delimiter else { return ids };
    let mut out: Vec<u32> = Vec::with_capacity(ids.len());
    for id in ids {
        if id == d && out.last().is_none_or(|&l| l == d) {
            continue;
        }
        out.push(id);
    }
    if out.last() == Some(&d) {
        out.pop();
    }
    out
}

fn single_char(s: &str) -> Option<char> {
    let mut it = s.chars();
    let c = it.next()?;
    it.next().is_none().then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(json: &str, size: usize) -> (tempfile::NamedTempFile, Vocab) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), json).unwrap();
        let v = Vocab::load(f.path(), size, 0).unwrap();
        (f, v)
    }

    #[test]
    fn words_are_case_folded_and_delimited() {
        let (_f, v) = vocab(r#"{"<pad>":0,"|":1,"A":2,"B":3,"C":4,"'":5}"#, 6);
        let l = Labeler::new(&v, LabelKind::Wrd, ",.", false);
        let out = l.label_all(["  ab, c'.  ", "Cab"].into_iter()).unwrap();
        assert_eq!(out.tokens, vec![vec![2, 3, 1, 4, 5], vec![4, 2, 3]]);
    }

    #[test]
    fn letter_and_unit_labels_keep_their_symbols() {
        let (_f, v) = vocab(r#"{"<pad>":0,"|":1,"e":2,"l":3,"pʰ":4}"#, 5);
        let ltr = Labeler::new(&v, LabelKind::Ltr, "", false).label_all(["E L | L E |"].into_iter()).unwrap();
        assert_eq!(ltr.tokens, vec![vec![2, 3, 1, 3, 2]]);
        let phn = Labeler::new(&v, LabelKind::Phn, "", false).label_all(["pʰ e | | l"].into_iter()).unwrap();
        assert_eq!(phn.tokens, vec![vec![4, 2, 1, 3]]);
    }

    #[test]
    fn phoneme_units_are_not_case_folded() {
        let (_f, v) = vocab(r#"{"<pad>":0,"|":1,"A":2,"ʃ":3,"ð":4}"#, 5);
        let out = Labeler::new(&v, LabelKind::Phn, "", false).label_all(["ʃ ð | ʃ"].into_iter()).unwrap();
        assert_eq!(out.tokens, vec![vec![3, 4, 1, 3]]);
    }

    #[test]
    fn unknown_symbols_are_listed_or_skipped() {
        let (_f, v) = vocab(r#"{"<pad>":0,"|":1,"a":2}"#, 3);
        let e = Labeler::new(&v, LabelKind::Wrd, "", false).label_all(["a x", "ya", "a"].into_iter()).unwrap_err().to_string();
        assert!(e.contains("2 transcripts use 2 symbols") && e.contains("\"x\" \"y\""), "{e}");
        let out = Labeler::new(&v, LabelKind::Wrd, "", true).label_all(["a x", "ya"].into_iter()).unwrap();
        assert_eq!((out.tokens, out.skipped), (vec![vec![2], vec![2]], 2));
    }
}
