//! Replication between VDSAs (DESIGN 4.1, 4.2, 4.4): the source stream with
//! its send queue and link, and the target server that ingests streams
//! into per-VPG journals.

pub mod queue;
pub mod source;
pub mod target;
pub mod throttle;
