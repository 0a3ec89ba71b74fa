//! s3router: wav2vec2 / XLS-R inference and S3-Router mask learning, on CPU and GPU.

pub mod analysis;
pub mod backend;
pub mod bench;
pub mod ctc;
pub mod data;
pub mod dropout;
pub mod eval;
pub mod fsio;
pub mod infer;
pub mod mask;
pub mod metrics;
pub mod model;
pub mod multitask;
pub mod plot;
pub mod rng;
pub mod router;
pub mod tensor;
pub mod train;
