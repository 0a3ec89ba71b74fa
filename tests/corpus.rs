//! The committed espeak-ng corpus (tools/make_corpus.py): every language and split reads as a
//! fairseq dataset, audio is 16 kHz with the lengths the manifests record, phoneme labels carry no
//! stress marks and cover every word, and the languages' phoneme inventories differ.

mod common;

use std::collections::BTreeSet;

use common::fixtures;
use s3router::data::audio;
use s3router::data::dataset::{open, DatasetOptions, LabelKind};

const LANGUAGES: [&str; 8] = ["en", "nl", "es", "it", "ru", "sv", "tr", "fr"];

#[test]
fn every_language_and_split_reads_and_decodes() {
    let mut inventories = Vec::new();
    for lang in LANGUAGES {
        let mut inventory = BTreeSet::new();
        for (split, n) in [("train", 16), ("dev", 4), ("test", 4)] {
            let tsv = fixtures().join(format!("corpus/{lang}/{split}.tsv"));
            let phn = open(&tsv, &DatasetOptions { labels: LabelKind::Phn, ..DatasetOptions::default() }).unwrap();
            let wrd = open(&tsv, &DatasetOptions { labels: LabelKind::Wrd, ..DatasetOptions::default() }).unwrap();
            assert_eq!(phn.utterances.len(), n, "{lang} {split}");
            for (p, w) in phn.utterances.iter().zip(&wrd.utterances) {
                assert!(!p.text.contains(['ˈ', 'ˌ']), "{lang}: stress marks left in {:?}", p.text);
                // espeak-ng's word boundaries need not match the text's ("appreciate" -> two
                // groups), but every word yields at least one phoneme.
                let units = p.text.split_whitespace().filter(|s| *s != "|").count();
                assert!(units >= w.text.split_whitespace().count(), "{lang}: {:?} for {:?}", p.text, w.text);
                inventory.extend(p.text.split_whitespace().filter(|s| *s != "|").map(String::from));
            }
            let first = &phn.utterances[0];
            assert_eq!(audio::load(&first.audio).unwrap().len(), first.samples.unwrap(), "{lang} {split}: manifest length");
        }
        inventories.push((lang, inventory));
    }
    for (i, (a, ia)) in inventories.iter().enumerate() {
        for (b, ib) in &inventories[i + 1..] {
            assert_ne!(ia, ib, "{a} and {b} have the same phoneme inventory");
        }
    }
}
