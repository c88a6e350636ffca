//! Packaging of the product: the VDSA OVA (OVF descriptor, streamOptimized
//! VMDK, manifest), systemd units and the Debian package for KVM hosts.
//!
//! It must not contain product logic: it only assembles what the other
//! crates build.
