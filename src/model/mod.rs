//! wav2vec2 models from Hugging Face folders.

pub mod checkpoint;
pub mod config;
pub mod fairseq;
pub mod folder;
pub mod masks;
pub mod pickle;
pub mod preprocess;
pub mod tasks;
pub mod torch_bin;
pub mod vocab;
pub mod wav2vec2;

pub use wav2vec2::{Trace, Wav2Vec2};
