//! Mask learning: the optimiser and schedule, the masked forward/backward, the training data
//! feed, checkpoints and the `engine train` loop.

pub mod adam;
pub mod checkpoint;
pub mod demo;
pub mod encoder;
pub mod feed;
pub mod finetune;
pub mod masked;
pub mod prune;
pub mod recipe_file;
pub mod run;
pub mod schedule;
pub mod specaugment;
