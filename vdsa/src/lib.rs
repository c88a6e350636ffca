//! The virtual data services appliance (VDSA): one per hypervisor host.
//!
//! This crate owns the data path of the product: the target-side journal
//! engine (redo log, content-addressed chunk store, per-disk index, replica,
//! point-in-time read views, retention), the tap receivers (an NBD server
//! that QEMU's block mirror writes to, with the checkpoint barrier), and
//! replication between VDSAs: the wire (frames, messages, TLS 1.3 with
//! site certificates), the source stream with its send queue, and the
//! target server that feeds each VPG's journal.
//!
//! Under a site manager, one long-lived `vdsa agent` per host runs any
//! number of roles that the site manager's desired state names.
//!
//! It must not hold control-plane state (VPG definitions, pairing, task
//! tracking: that is the site manager's), and it must not talk to a
//! hypervisor's management API beyond its own host's QEMU monitor (QMP),
//! where it attaches and detaches the taps its desired state names, and
//! its VMs' guest agents or quiesce hooks, which it runs when asked.

pub mod agent;
pub mod conn_limit;
mod conn_task;
pub mod daemon;
mod direct_io;
pub mod journal;
pub mod kvm;
pub mod native_tap;
pub mod nbd;
mod payload;
pub mod recovery;
pub mod replication;
pub mod serving;
pub mod tap;
pub mod wire;
