//! End-to-end tests that run, kill and verify real processes: the journal
//! under SIGKILL, and the KVM tap with the real QEMU.

mod crash;
mod kvm_tap;
mod power_loss;
mod replication;
mod vsphere;
