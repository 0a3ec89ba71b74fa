//! When each token and word of a transcript was said, as transformers' ASR pipeline reports
//! them (`return_timestamps="char"` / `"word"`): a token's time is the run of frames its path
//! spends on it ([`crate::ctc::align`]), at the model's frame stride (20 ms for wav2vec2).

use crate::ctc::align::Span;
use crate::data::audio::SAMPLE_RATE;
use crate::data::labels::DELIMITER;
use crate::model::vocab::Vocab;

/// A piece of a transcript and when it was said, in seconds from the start of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    pub text: String,
    pub start: f64,
    pub end: f64,
}

/// The transcript's tokens with their times, for frames `frame_stride` samples apart: special
/// tokens left out (as from the transcript), the word delimiter as a space.
pub fn token_stamps(spans: &[Span], vocab: &Vocab, frame_stride: usize) -> Vec<Stamp> {
    // Sample counts divided once, as transformers computes them (no drift from adding up 0.02).
    let seconds = |frame: usize| (frame * frame_stride) as f64 / SAMPLE_RATE as f64;
    spans
        .iter()
        .filter(|s| vocab.is_content(s.token))
        .map(|s| {
            let token = vocab.token(s.token as usize);
            Stamp {
                text: if token == DELIMITER { " ".into() } else { token.into() },
                start: seconds(s.frames.start),
                end: seconds(s.frames.end),
            }
        })
        .collect()
}

/// Words from token stamps: the runs between spaces, from their first token's start to their
/// last token's end.
pub fn word_stamps(tokens: &[Stamp]) -> Vec<Stamp> {
    tokens
        .split(|t| t.text == " ")
        .filter(|w| !w.is_empty())
        .map(|w| Stamp { text: w.iter().map(|t| t.text.as_str()).collect(), start: w[0].start, end: w[w.len() - 1].end })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_join_the_tokens_between_delimiters() {
        let vocab = Vocab::from_tokens(["<pad>", "<unk>", "|", "a", "b"].map(String::from).to_vec(), 0).unwrap();
        let spans: Vec<Span> = [(3, 1..3), (1, 3..4), (4, 4..5), (2, 6..7), (2, 8..9), (4, 9..12)]
            .into_iter()
            .map(|(token, frames)| Span { token, frames })
            .collect();
        let tokens = token_stamps(&spans, &vocab, 320);
        let texts: Vec<&str> = tokens.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", " ", " ", "b"], "<unk> left out as from the transcript");
        let words = word_stamps(&tokens);
        // Exactly the nearest doubles of the sample counts over 16 kHz.
        let close = |a: f64, b: f64| a == b;
        assert_eq!(words.iter().map(|w| w.text.as_str()).collect::<Vec<_>>(), ["ab", "b"]);
        assert!(close(words[0].start, 0.02) && close(words[0].end, 0.10) && close(words[1].start, 0.18) && close(words[1].end, 0.24));
    }
}
