//! The CTC vocabulary (`vocab.json`, token -> id) and turning token ids into text.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

#[derive(Clone, Debug)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    blank: usize,
}

/// Special tokens of vocabularies built here, in id order; `<pad>` is the CTC blank.
const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// `vocab.json` as its token -> id object.
fn read_map(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    read_language_map(path, None)
}

/// The token -> id object of `path`; with `lang`, the one of that language in a vocab.json that
/// holds one per language (MMS's, read as transformers' tokenizer does with `target_lang`).
fn read_language_map(path: &Path, lang: Option<&str>) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let serde_json::Value::Object(map) = json else { bail!("{}: expected an object of token -> id", path.display()) };
    let per_language = map.values().next().is_some_and(serde_json::Value::is_object);
    match (lang, per_language) {
        (None, false) => Ok(map),
        (None, true) => bail!("{}: one vocabulary per language ({} of them): choose one with --target-lang", path.display(), map.len()),
        (Some(l), true) => match map.get(l) {
            Some(serde_json::Value::Object(m)) => Ok(m.clone()),
            _ => bail!("{}: no vocabulary for language {l:?}", path.display()),
        },
        (Some(l), false) => bail!("{}: a single vocabulary, not one per language (--target-lang {l})", path.display()),
    }
}

/// Tokens like `<s>`, `</s>`, `<unk>`, `[PAD]`: dropped from transcripts.
fn is_special(token: &str) -> bool {
    (token.starts_with('<') && token.ends_with('>') && token.len() > 2)
        || (token.starts_with('[') && token.ends_with(']') && token.len() > 2)
}

impl Vocab {
    /// A vocabulary from tokens in id order.
    pub fn from_tokens(tokens: Vec<String>, blank: usize) -> Result<Vocab> {
        ensure!(blank < tokens.len(), "blank id {blank} is outside a vocabulary of {}", tokens.len());
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        ensure!(ids.len() == tokens.len(), "the vocabulary lists a token twice");
        Ok(Vocab { tokens, ids, blank })
    }

    /// A CTC vocabulary from a fairseq `dict.*.txt` (`SYMBOL COUNT` lines): the specials
    /// `<pad>` (the blank, id 0), `<s>`, `</s>`, `<unk>`, then the symbols in file order.
    pub fn from_fairseq_dict(path: &Path) -> Result<Vocab> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let sym = line.split_whitespace().next().with_context(|| format!("{} line {}: empty symbol", path.display(), i + 1))?;
            if !tokens.iter().any(|t| t == sym) {
                tokens.push(sym.to_string());
            }
        }
        Vocab::from_tokens(tokens, 0)
    }

    /// A CTC vocabulary built from training transcripts already split into symbols: the
    /// specials (`<pad>` = blank = id 0, `<s>`, `</s>`, `<unk>`), then `|`, then every other
    /// symbol by falling frequency (ties in code-point order), so rebuilding is deterministic.
    pub fn build<'a>(symbols: impl Iterator<Item = &'a str>) -> Vocab {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        symbols.for_each(|s| *counts.entry(s).or_default() += 1);
        let mut rest: Vec<(&str, usize)> = counts.into_iter().filter(|(s, _)| *s != "|" && !SPECIALS.contains(s)).collect();
        rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let tokens =
            SPECIALS.iter().copied().chain(std::iter::once("|")).chain(rest.into_iter().map(|(s, _)| s)).map(String::from).collect();
        Vocab::from_tokens(tokens, 0).expect("built vocabularies are valid")
    }

    /// Writes `vocab.json` (token -> id), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: serde_json::Map<String, serde_json::Value> = self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i.into())).collect();
        let text = serde_json::to_string_pretty(&map)?;
        crate::fsio::atomic_write(path, |f| f.write_all(text.as_bytes()))
    }

    /// Reads `vocab.json`, which must give each id in `0..vocab_size` exactly one token.
    pub fn load(path: &Path, vocab_size: usize, blank: usize) -> Result<Vocab> {
        Vocab::load_language(path, None, vocab_size, blank)
    }

    /// [`Vocab::load`] of language `lang`'s vocabulary in a per-language vocab.json (MMS).
    pub fn load_language(path: &Path, lang: Option<&str>, vocab_size: usize, blank: usize) -> Result<Vocab> {
        Vocab::from_map(path, &read_language_map(path, lang)?, vocab_size, blank)
    }

    /// Reads a task's `vocab.json` (as `engine train` and `engine vocab` write it) whatever its
    /// size: ids `0..n` for its `n` tokens, the blank at `blank`.
    pub fn load_task(path: &Path, blank: usize) -> Result<Vocab> {
        let map = read_map(path)?;
        Vocab::from_map(path, &map, map.len(), blank)
    }

    fn from_map(path: &Path, map: &serde_json::Map<String, serde_json::Value>, vocab_size: usize, blank: usize) -> Result<Vocab> {
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
        Vocab::from_tokens(tokens.into_iter().map(Option::unwrap).collect(), blank)
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
    fn built_vocab_orders_by_frequency_and_round_trips() {
        let v = Vocab::build("a b | a c a | b".split(' '));
        assert_eq!(v.tokens(), ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c"]);
        let f = tempfile::NamedTempFile::new().unwrap();
        v.save(f.path()).unwrap();
        let back = Vocab::load(f.path(), 8, 0).unwrap();
        assert_eq!(back.tokens(), v.tokens());
        assert_eq!(back.id("c"), Some(7));
    }

    #[test]
    fn fairseq_dict_gets_the_specials_first() {
        let f = write("| 120\nE 90\nT 70\n");
        let v = Vocab::from_fairseq_dict(f.path()).unwrap();
        assert_eq!(v.tokens(), ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T"]);
        assert_eq!(v.blank(), 0);
    }

    #[test]
    fn size_mismatch_and_duplicate_ids_are_errors() {
        let f = write(r#"{"<pad>":0,"a":1}"#);
        assert!(Vocab::load(f.path(), 3, 0).unwrap_err().to_string().contains("vocab_size is 3"));
        let f = write(r#"{"<pad>":0,"a":0}"#);
        assert!(Vocab::load(f.path(), 2, 0).is_err());
    }
}
