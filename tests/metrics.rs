//! Error-rate counts against jiwer's alignments (tools/make_ctc_fixtures.py).

mod common;

use common::fixtures;
use s3router::metrics::{word_and_char_counts, Counts, TextNorm};

#[test]
fn word_and_character_counts_match_jiwer() {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("ctc/cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in meta["error_rates"].as_array().unwrap() {
        let (r, h) = (case["ref"].as_str().unwrap(), case["hyp"].as_str().unwrap());
        let Some(w) = case.get("words") else { continue };
        let (words, chars) = word_and_char_counts(r, h, &TextNorm::default());
        let want = |j: &serde_json::Value| {
            (
                j["hits"].as_u64().unwrap() as usize,
                j["sub"].as_u64().unwrap() as usize,
                j["del"].as_u64().unwrap() as usize,
                j["ins"].as_u64().unwrap() as usize,
            )
        };
        let got = |c: &Counts| (c.hits, c.sub, c.del, c.ins);
        assert_eq!(got(&words), want(w), "words: {r:?} vs {h:?}");
        assert_eq!(got(&chars), want(&case["chars"]), "chars: {r:?} vs {h:?}");
        checked += 1;
    }
    assert_eq!(checked, 5);
}
