//! Getting speech into the engine.

pub mod audio;
