//! Audio decoding: every WAV sample format, FLAC, stereo, resampling, and bad files.

mod common;

use std::path::Path;

use common::{fixtures, utterances};
use s3router::data::audio;

fn write_wav(path: &Path, spec: hound::WavSpec, frames: &[f32]) {
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &x in frames {
        for _ in 0..spec.channels {
            match (spec.sample_format, spec.bits_per_sample) {
                (hound::SampleFormat::Float, _) => w.write_sample(x).unwrap(),
                (_, 8) => w.write_sample((x * 127.0).round() as i8).unwrap(),
                (_, 16) => w.write_sample((x * 32767.0).round() as i16).unwrap(),
                (_, bits) => w.write_sample((x as f64 * ((1i64 << (bits - 1)) - 1) as f64).round() as i32).unwrap(),
            }
        }
    }
    w.finalize().unwrap();
}

fn tone(n: usize, rate: f32) -> Vec<f32> {
    (0..n).map(|i| (2.0 * std::f32::consts::PI * 220.0 * i as f32 / rate).sin() * 0.6).collect()
}

#[test]
fn every_wav_sample_format_decodes_to_the_same_signal() {
    let dir = tempfile::tempdir().unwrap();
    let x = tone(4000, 16000.0);
    for (format, bits, tol) in [
        (hound::SampleFormat::Int, 8, 1e-2),
        (hound::SampleFormat::Int, 16, 1e-4),
        (hound::SampleFormat::Int, 24, 1e-6),
        (hound::SampleFormat::Int, 32, 1e-6),
        (hound::SampleFormat::Float, 32, 1e-7),
    ] {
        for channels in [1, 2] {
            let path = dir.path().join(format!("t{bits}{format:?}{channels}.wav"));
            let spec = hound::WavSpec { channels, sample_rate: 16000, bits_per_sample: bits, sample_format: format };
            write_wav(&path, spec, &x);
            let y = audio::load(&path).unwrap();
            assert_eq!(y.len(), x.len());
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err <= tol, "{bits}-bit {format:?} x{channels}: max error {err}");
        }
    }
}

#[test]
fn flac_decodes_to_exactly_the_wav_samples() {
    let wav = audio::load(&utterances()[0]).unwrap();
    let flac = audio::load(&fixtures().join("audio/utt0.flac")).unwrap();
    assert_eq!(wav, flac);
}

#[test]
fn other_rates_are_resampled_to_16k() {
    let dir = tempfile::tempdir().unwrap();
    for rate in [8000u32, 22050, 44100, 48000] {
        let path = dir.path().join(format!("r{rate}.wav"));
        let spec = hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        write_wav(&path, spec, &tone(rate as usize / 2, rate as f32));
        let y = audio::load(&path).unwrap();
        assert_eq!(y.len(), 8000, "{rate} Hz: half a second must become 8000 samples");
        // The 220 Hz tone is still there: compare to the ideal 16 kHz tone away from the edges.
        let want = tone(8000, 16000.0);
        let err = (800..7200).map(|i| (y[i] - want[i]).abs()).fold(0.0f32, f32::max);
        assert!(err < 2e-2, "{rate} Hz: max deviation {err}");
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.wav");
    std::fs::write(&text, "this is not audio").unwrap();
    assert!(audio::load(&text).unwrap_err().to_string().contains("not a WAV, FLAC or MP3"));

    let empty = dir.path().join("empty.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    write_wav(&empty, spec, &[]);
    assert!(audio::load(&empty).unwrap_err().to_string().contains("no audio samples"));

    let truncated = dir.path().join("cut.flac");
    let bytes = std::fs::read(fixtures().join("audio/utt0.flac")).unwrap();
    std::fs::write(&truncated, &bytes[..40]).unwrap();
    assert!(audio::load(&truncated).is_err());

    let missing = dir.path().join("missing.wav");
    assert!(audio::load(&missing).unwrap_err().to_string().contains("missing.wav"));
}
