//! A VM's config disk: a small read-only disk whose first bytes are text
//! (its network settings at recovery), served beside a stack's disks so
//! that a KVM guest can read and apply them (docs/recovery.md).

use crate::nbd::export::{BlockExport, ExportError};
use crate::nbd::proto::{EINVAL, EPERM};

/// The disk's size: the text is at most this, zeros after it.
pub const CONFIG_DISK_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub struct ConfigDisk {
    text: Vec<u8>,
}

impl ConfigDisk {
    /// A config disk holding `text` (cut at [`CONFIG_DISK_BYTES`]).
    pub fn new(text: &str) -> ConfigDisk {
        let mut text = text.as_bytes().to_vec();
        text.truncate(CONFIG_DISK_BYTES as usize);
        ConfigDisk { text }
    }
}

fn read_only() -> ExportError {
    ExportError::new(EPERM, "a config disk is read-only")
}

impl BlockExport for ConfigDisk {
    fn size(&self) -> u64 {
        CONFIG_DISK_BYTES
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > CONFIG_DISK_BYTES) {
            return Err(ExportError::new(EINVAL, "read beyond the end of the config disk"));
        }
        buf.fill(0);
        let start = (offset as usize).min(self.text.len());
        let end = (offset as usize + buf.len()).min(self.text.len());
        buf[..end - start].copy_from_slice(&self.text[start..end]);
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), ExportError> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Err(read_only())
    }

    fn trim(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Err(read_only())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_its_text_then_zeros_and_refuses_writes() {
        let d = ConfigDisk::new("address=10.1.2.3/24\n");
        let mut buf = vec![1u8; 32];
        assert!(d.read(0, &mut buf).is_ok());
        assert_eq!(&buf[..20], b"address=10.1.2.3/24\n");
        assert!(buf[20..].iter().all(|&b| b == 0));
        assert!(d.read(CONFIG_DISK_BYTES - 1, &mut buf).is_err());
        assert!(d.write(0, b"x").is_err() && d.read_only());
    }
}
