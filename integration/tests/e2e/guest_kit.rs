//! The guest kit boots a real guest through its firmware from a disk it
//! built from files alone, and the guest's writes to the disk's data area
//! land where the kit said the data area is.

use integration::guest::{Boot, GuestConfig, GuestKit, Initramfs, BLOCK_MODULES};
use std::time::Duration;

#[test]
fn a_guest_boots_from_a_disk_the_kit_built_and_writes_its_data_area() {
    let _turn = crate::take_turns();
    let kit = GuestKit::prepare().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let initramfs = dir.path().join("initrd");
    kit.build_initramfs(
        &Initramfs {
            modules: BLOCK_MODULES.to_vec(),
            programs: Vec::new(),
            init: "i=0; while [ ! -b /dev/vda2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
                   echo \"GUEST: booted from disk, data area $(cat /sys/block/vda/vda2/size) sectors\"\n\
                   echo guest-was-here | dd of=/dev/vda2 bs=512 seek=3 conv=notrunc,fsync 2>/dev/null\n\
                   echo GUEST: wrote"
                .into(),
        },
        &initramfs,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let disk =
        kit.build_boot_disk(&initramfs, "", 48, 8, &dir.path().join("disk.img")).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((disk.data_offset, disk.data_len), (48 << 20, 8 << 20));
    let mut guest = kit
        .boot(&GuestConfig {
            boot: Boot::FirstDisk,
            memory_mb: 256,
            disks: vec![disk.path.clone()],
            forwards: Vec::new(),
            nbd_disks: Vec::new(),
            read_only_nbd_disks: Vec::new(),
            console: dir.path().join("console.log"),
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    guest
        .wait_for("GUEST: booted from disk, data area 16384 sectors", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    guest.wait_for("GUEST: wrote", Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}"));
    guest.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}"));
    let image = std::fs::read(&disk.path).unwrap_or_else(|e| panic!("{e}"));
    let at = disk.data_offset as usize + 3 * 512;
    assert_eq!(&image[at..at + 14], b"guest-was-here");
}
