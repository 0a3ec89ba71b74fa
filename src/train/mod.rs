//! Training pieces shared by mask learning and finetuning: the optimiser and the schedules.

pub mod adam;
pub mod checkpoint;
pub mod masked;
pub mod schedule;
pub mod specaugment;
