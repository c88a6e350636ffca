//! The site manager: the control plane of one site.
//!
//! It owns the persistent store (sled), the REST API, the management link
//! its VDSAs dial, the reconciler that drives them towards the VPGs'
//! definitions, the checkpoint coordinator (the two-phase barrier of
//! docs/architecture.md §3, with the quiesce step of application-consistent
//! checkpoints), pairing with the other site and the site-to-site exchange
//! (`peering`), the log collector (`logs`), vSphere deploys as tasks
//! (`deploy`, over the vSphere adapter), the test and recovered VMs on
//! vSphere recovery hosts (`recovery_vms`), what it measures for the API
//! and Prometheus (`metrics`), alerts with their webhook (`alerts`), the
//! sizing analyzer (`sizing`), the health report (`health`), the web
//! console served beside the API (`console`), and the operator CLI over a
//! typed client (`cli`, `client`). On KVM the VDSA attaches its own taps over
//! QMP, on the desired state's word.
//!
//! The daemon's shared state (`state`) is defined below the services that
//! use it, and the API's types (`model`) below the store, so the imports
//! run one way (docs/architecture.md, "The site manager's modules").
//!
//! It must not touch replicated data itself: bytes flow through the VDSAs;
//! the site manager only tells them what to do.

pub mod alerts;
pub mod api;
pub mod barrier_hold;
pub mod barrier_thread;
pub mod clean_point;
pub mod cli;
pub mod client;
pub mod console;
pub mod coordinator;
pub mod deploy;
pub mod encryption;
pub mod failover_tests;
pub mod health;
pub mod links;
pub mod logs;
pub mod metrics;
pub mod mgmt;
pub mod model;
pub mod peering;
pub mod pki;
pub mod reconcile;
pub mod recovery_vms;
pub mod server;
pub mod sizing;
pub mod state;
pub mod store;
pub mod vsphere;
