//! Getting speech into the engine.

pub mod audio;
pub mod batching;
pub mod dataset;
pub mod labels;
