//! The site manager: the control plane of one site.
//!
//! It will own the persistent store (sled), the REST API and web UI, pairing
//! with the peer site, the checkpoint coordinator (the two-phase barrier of
//! architecture.md §3), recovery orchestration (failover, tests, move, failback),
//! monitoring and log collection, and the operator CLI.
//!
//! It must not touch replicated data itself: bytes flow through the VDSAs;
//! the site manager only tells them what to do.

pub mod cli;
pub mod kvm;
pub mod vsphere;
