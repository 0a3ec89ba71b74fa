//! Audio files to 16 kHz mono f32: WAV (8/16/24/32-bit integer, 32-bit float) via `hound`, FLAC
//! and MP3 (CommonVoice) via `symphonia`; channels averaged; other rates resampled with
//! `rubato`'s FFT resampler.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rubato::{FftFixedIn, Resampler};

pub const SAMPLE_RATE: u32 = 16_000;

/// Decoded audio before resampling.
struct Decoded {
    /// Interleaved samples in [-1, 1].
    samples: Vec<f32>,
    channels: usize,
    rate: u32,
}

/// The container formats the engine decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Wav,
    Flac,
    Mp3,
}

impl Kind {
    /// The file extension symphonia's prober takes as a hint, and the name used in messages.
    fn name(self) -> &'static str {
        match self {
            Kind::Wav => "wav",
            Kind::Flac => "flac",
            Kind::Mp3 => "mp3",
        }
    }
}

/// The format of a file, from its first bytes.
fn sniff(path: &Path) -> Result<Kind> {
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .with_context(|| format!("cannot open audio file {}", path.display()))?
        .read(&mut magic)
        .with_context(|| format!("cannot read {}", path.display()))?;
    match &magic[..n] {
        b"RIFF" => Ok(Kind::Wav),
        b"fLaC" => Ok(Kind::Flac),
        // An ID3 tag, or an MPEG audio frame sync (11 set bits).
        [b'I', b'D', b'3', ..] => Ok(Kind::Mp3),
        [0xFF, b, ..] if b & 0xE0 == 0xE0 => Ok(Kind::Mp3),
        _ => bail!("{}: not a WAV, FLAC or MP3 file", path.display()),
    }
}

/// A symphonia reader over a FLAC or MP3 file (its header parsed, nothing decoded yet).
fn open_compressed(path: &Path, kind: Kind) -> Result<Box<dyn symphonia::core::formats::FormatReader>, symphonia::core::errors::Error> {
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;
    let mss = MediaSourceStream::new(Box::new(File::open(path)?), Default::default());
    let mut hint = Hint::new();
    hint.with_extension(kind.name());
    Ok(symphonia::default::get_probe().format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())?.format)
}

/// Checks that a file is audio the engine can read, from its header alone (no decoding).
pub fn probe(path: &Path) -> Result<()> {
    match sniff(path)? {
        Kind::Wav => hound::WavReader::open(path).map(|_| ()).with_context(|| format!("{}: not a readable WAV file", path.display())),
        kind => {
            let format = open_compressed(path, kind).map_err(|e| anyhow::anyhow!("{}: unreadable audio ({e})", path.display()))?;
            format.default_track().with_context(|| format!("{}: no audio track", path.display()))?;
            Ok(())
        }
    }
}

/// Length of an audio file in 16 kHz samples, from its header where it says (WAV, FLAC), else
/// by decoding it.
pub fn duration_samples(path: &Path) -> Result<usize> {
    let from_header = match sniff(path)? {
        Kind::Wav => hound::WavReader::open(path).ok().map(|r| (r.duration() as u64, r.spec().sample_rate)),
        kind => open_compressed(path, kind).ok().and_then(|f| {
            let params = &f.default_track()?.codec_params;
            Some((params.n_frames?, params.sample_rate?))
        }),
    };
    match from_header {
        Some((frames, rate)) => Ok((frames * SAMPLE_RATE as u64).div_ceil(rate as u64) as usize),
        None => Ok(load(path)?.len()),
    }
}

/// Loads an audio file as 16 kHz mono samples in [-1, 1].
pub fn load(path: &Path) -> Result<Vec<f32>> {
    let decoded = match sniff(path)? {
        Kind::Wav => read_wav(path),
        kind => read_compressed(path, kind),
    }?;
    ensure!(decoded.channels > 0 && !decoded.samples.is_empty(), "{}: the file holds no audio samples", path.display());
    let mono = downmix(&decoded.samples, decoded.channels);
    resample(&mono, decoded.rate, SAMPLE_RATE).with_context(|| format!("{}: resampling from {} Hz", path.display(), decoded.rate))
}

fn read_wav(path: &Path) -> Result<Decoded> {
    let reader = hound::WavReader::open(path).with_context(|| format!("{}: not a readable WAV file", path.display()))?;
    let spec = reader.spec();
    let bad = |e: hound::Error| anyhow::anyhow!("{}: corrupt WAV data ({e})", path.display());
    let samples: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader.into_samples::<f32>().collect::<Result<_, _>>().map_err(bad)?,
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader.into_samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect::<Result<_, _>>().map_err(bad)?
        }
        (fmt, bits) => bail!("{}: unsupported WAV sample format ({bits}-bit {fmt:?})", path.display()),
    };
    Ok(Decoded { samples, channels: spec.channels as usize, rate: spec.sample_rate })
}

/// FLAC or MP3 through symphonia.
fn read_compressed(path: &Path, kind: Kind) -> Result<Decoded> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::DecoderOptions;
    use symphonia::core::errors::Error as SymError;

    let bad = |e: SymError| anyhow::anyhow!("{}: corrupt {} data ({e})", path.display(), kind.name().to_uppercase());
    let mut format = open_compressed(path, kind).map_err(bad)?;
    let track = format.default_track().with_context(|| format!("{}: no audio track", path.display()))?;
    let (track_id, params) = (track.id, track.codec_params.clone());
    let rate = params.sample_rate.with_context(|| format!("{}: sample rate unknown", path.display()))?;
    let mut decoder = symphonia::default::get_codecs().make(&params, &DecoderOptions::default()).map_err(bad)?;
    let (mut samples, mut channels) = (Vec::new(), params.channels.map_or(0, |c| c.count()));
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(bad(e)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let audio = decoder.decode(&packet).map_err(bad)?;
        channels = audio.spec().channels.count();
        let mut buf = SampleBuffer::<f32>::new(audio.capacity() as u64, *audio.spec());
        buf.copy_interleaved_ref(audio);
        samples.extend_from_slice(buf.samples());
    }
    Ok(Decoded { samples, channels, rate })
}

/// Averages interleaved channels into one.
fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels == 1 {
        return interleaved.to_vec();
    }
    interleaved.chunks_exact(channels).map(|f| f.iter().sum::<f32>() / channels as f32).collect()
}

/// Band-limited resampling of one channel; the output has `ceil(n · to / from)` samples, aligned
/// with the input (the resampler's delay is removed).
pub fn resample(x: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to {
        return Ok(x.to_vec());
    }
    ensure!(from > 0, "sample rate 0");
    let want = (x.len() as u64 * to as u64).div_ceil(from as u64) as usize;
    let mut rs = FftFixedIn::<f32>::new(from as usize, to as usize, 1024, 2, 1)?;
    let delay = rs.output_delay();
    let mut out = Vec::with_capacity(want + delay + 2048);
    let mut pos = 0;
    while x.len() - pos >= rs.input_frames_next() {
        let n = rs.input_frames_next();
        out.extend_from_slice(&rs.process(&[&x[pos..pos + n]], None)?[0]);
        pos += n;
    }
    out.extend_from_slice(&rs.process_partial(Some(&[&x[pos..]]), None)?[0]);
    while out.len() < want + delay {
        out.extend_from_slice(&rs.process_partial::<&[f32]>(None, None)?[0]);
    }
    Ok(out[delay..delay + want].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampled_sine_keeps_its_frequency_and_amplitude() {
        let (from, f) = (44_100u32, 440.0f32);
        let x: Vec<f32> = (0..from).map(|i| (2.0 * std::f32::consts::PI * f * i as f32 / from as f32).sin() * 0.5).collect();
        let y = resample(&x, from, SAMPLE_RATE).unwrap();
        assert_eq!(y.len(), SAMPLE_RATE as usize);
        // Away from the edges the output equals the ideal sine sampled at 16 kHz.
        let err = (1000..15000)
            .map(|i| (y[i] - (2.0 * std::f32::consts::PI * f * i as f32 / SAMPLE_RATE as f32).sin() * 0.5).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-2, "max deviation {err}");
    }

    #[test]
    fn downmix_averages_channels() {
        assert_eq!(downmix(&[1.0, 0.0, 0.5, 0.5], 2), vec![0.5, 0.5]);
    }
}
