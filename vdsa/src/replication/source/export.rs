//! A source stream's disks as tap exports (NBD or the native tap
//! protocol): each write is numbered and queued, never stored here.

use crate::nbd::export::{BlockExport, ExportError, WriteWait};
use crate::nbd::proto::{EIO, ENOSPC};
use protection_groups::{DiskId, WriteKind};
use std::sync::Arc;

use super::SourceStream;

/// One protected disk of a source stream as an NBD (or native tap) export.
#[derive(Debug)]
pub struct SourceDisk {
    pub stream: Arc<SourceStream>,
    pub disk: DiskId,
}

impl SourceDisk {
    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ExportError::new(ENOSPC, format!("{len} bytes at {offset} is beyond the disk's {size} bytes")));
        }
        Ok(())
    }
}

impl BlockExport for SourceDisk {
    /// The stream's size of the disk: a resize shows to the next client.
    fn size(&self) -> u64 {
        self.stream.disk_size(self.disk).unwrap_or(0)
    }

    /// A source VDSA holds no copy of the disk: the tap only writes.
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), ExportError> {
        Err(ExportError::new(EIO, "a source VDSA holds no copy of the disk to read"))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        self.write_owned(offset, data.to_vec())
    }

    /// The queue keeps the tap's buffer itself: no copy.
    fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.stream.put(self.disk, offset, data.len() as u64, WriteKind::Data, data)
    }

    fn keeps_write_buffers(&self) -> bool {
        true
    }

    /// A write waits while the stream holds a checkpoint: the server
    /// awaits the release first, holding no thread.
    fn write_wait(&self) -> Option<WriteWait<'_>> {
        self.stream.held().map(|_| Box::pin(self.stream.until_released()) as WriteWait<'_>)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, len, WriteKind::Zero, Vec::new())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.put(self.disk, offset, len, WriteKind::Trim, Vec::new())
    }

    /// Replication is asynchronous: nothing is made durable here (the
    /// protected disk holds the writes; a restarted source resyncs), so
    /// FLUSH and FUA are not offered. A client that sends a flush anyway
    /// is answered at once.
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    fn offers_durability(&self) -> bool {
        false
    }
}
