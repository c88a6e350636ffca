//! Recovery at the target VDSA: processing stacks (a VPG's disks at one
//! checkpoint, read through a pinned journal view, with a private write
//! overlay per disk) served as NBD exports, for failover tests and
//! failover (docs/recovery.md).
//!
//! Opening a stack copies nothing and never writes to the journal or the
//! replica; any number run side by side over one journal. Discarding one
//! frees its overlays and its pin on the journal's retention.

mod config_disk;
mod error;
mod overlay;
mod promotion;
mod stack;

pub use config_disk::{ConfigDisk, CONFIG_DISK_BYTES};
pub use error::{Error, Result};
pub use overlay::Overlay;
pub use promotion::PromotionProgress;
pub use stack::{ProcessingStack, StackDisk};

/// The NBD export name of a VM's config disk beside a stack.
pub fn config_export_name(stack: protection_groups::StackId, vm: protection_groups::VmId) -> String {
    format!("{}/{}.config", stack.0, vm.0)
}

/// The NBD export name of one disk of a stack.
pub fn export_name(stack: protection_groups::StackId, disk: protection_groups::DiskId) -> String {
    format!("{}/{}", stack.0, disk.0)
}
