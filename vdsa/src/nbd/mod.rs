//! The Network Block Device protocol: a server for tap targets and exports,
//! and a small client (used to play the guest in tests and benchmarks).

pub mod client;
pub mod export;
pub mod proto;
pub mod server;
mod session;
