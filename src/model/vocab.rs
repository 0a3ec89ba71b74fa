//! The CTC vocabulary (`vocab.json`, token -> id) and turning token ids into text.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

#[derive(Clone, Debug)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    blank: usize,
}

/// Tokens like `<s>`, `</s>`, `<unk>`, `[PAD]`: dropped from transcripts.
fn is_special(token: &str) -> bool {
    (token.starts_with('<') && token.ends_with('>') && token.len() > 2)
        || (token.starts_with('[') && token.ends_with(']') && token.len() > 2)
}

impl Vocab {
    /// Reads `vocab.json`, which must give each id in `0..vocab_size` exactly one token.
    pub fn load(path: &Path, vocab_size: usize, blank: usize) -> Result<Vocab> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let map = json.as_object().with_context(|| format!("{}: expected an object of token -> id", path.display()))?;
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        for (tok, id) in map {
            let id = id.as_u64().with_context(|| format!("{}: id of token {tok:?} is not an integer", path.display()))? as usize;
            ensure!(id < vocab_size, "{}: token {tok:?} has id {id}, but the model's vocab_size is {vocab_size}", path.display());
            if let Some(other) = &tokens[id] {
                bail!("{}: tokens {other:?} and {tok:?} share id {id}", path.display());
            }
            tokens[id] = Some(tok.clone());
        }
        ensure!(map.len() == vocab_size, "{}: {} tokens, but the model's vocab_size is {vocab_size}", path.display(), map.len());
        let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap).collect();
        let ids = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        Ok(Vocab { tokens, ids, blank })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn blank(&self) -> usize {
        self.blank
    }

    pub fn token(&self, id: usize) -> &str {
        &self.tokens[id]
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Whether a token is transcript content (not the blank, not a special token).
    pub fn is_content(&self, id: u32) -> bool {
        id as usize != self.blank && !is_special(&self.tokens[id as usize])
    }

    /// The tokens, by id.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Text of a decoded id sequence as transformers' CTC tokenizer writes it: special tokens
    /// and the blank dropped, `|` as the word delimiter, tokens joined, spaces tidied.
    pub fn text(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for &id in ids.iter().filter(|&&id| self.is_content(id)) {
            let tok = &self.tokens[id as usize];
            if tok == "|" {
                s.push(' ');
            } else {
                s.push_str(tok);
            }
        }
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), json).unwrap();
        f
    }

    #[test]
    fn text_drops_blank_and_specials_and_maps_delimiter() {
        let f = write(r#"{"<pad>":0,"<s>":1,"|":2,"H":3,"I":4}"#);
        let v = Vocab::load(f.path(), 5, 0).unwrap();
        assert_eq!(v.text(&[1, 3, 4, 2, 2, 4, 0, 3, 2]), "HI IH");
    }

    #[test]
    fn size_mismatch_and_duplicate_ids_are_errors() {
        let f = write(r#"{"<pad>":0,"a":1}"#);
        assert!(Vocab::load(f.path(), 3, 0).unwrap_err().to_string().contains("vocab_size is 3"));
        let f = write(r#"{"<pad>":0,"a":0}"#);
        assert!(Vocab::load(f.path(), 2, 0).is_err());
    }
}
