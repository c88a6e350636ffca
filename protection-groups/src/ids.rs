//! Identifiers. Each is its own type so that a disk id can never be passed
//! where a VM id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String, format = Uuid))]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                $name(Uuid::new_v4())
            }
            /// The id whose 16 bytes are `bytes` (as stored on disk or wire).
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                $name(Uuid::from_bytes(bytes))
            }
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "-{}"), self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

uuid_id!(
    /// A site (protected or recovery), one site manager each.
    SiteId,
    "site"
);
uuid_id!(
    /// A hypervisor host; one VDSA runs on each.
    HostId,
    "host"
);
uuid_id!(
    /// A protected virtual machine.
    VmId,
    "vm"
);
uuid_id!(
    /// A protected virtual disk.
    DiskId,
    "disk"
);
uuid_id!(
    /// A virtual protection group.
    VpgId,
    "vpg"
);
uuid_id!(
    /// A processing stack: a VPG's disks at one checkpoint with a private
    /// write overlay, for a failover test or a failover (architecture.md
    /// §6). A failover test is known by its stack's id.
    StackId,
    "stack"
);

uuid_id!(
    /// One source VDSA's flow of writes for one VPG (architecture.md §2).
    StreamId,
    "stream"
);

/// A checkpoint of a VPG. Checkpoint ids grow with time within a VPG, so
/// their order is the order of the points in time they name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = u64))]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cp-{}", self.0)
    }
}

impl fmt::Debug for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bytes_and_json() {
        let d = DiskId::new();
        assert_eq!(DiskId::from_bytes(*d.as_bytes()), d);
        let json = serde_json::to_string(&d).unwrap_or_default();
        let back: DiskId = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, d);
        assert!(d.to_string().starts_with("disk-"));
        assert_eq!(CheckpointId(7).to_string(), "cp-7");
    }
}
