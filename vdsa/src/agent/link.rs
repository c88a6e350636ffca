//! Framing of the management link on the VDSA's side: a 4-byte big-endian
//! length and one JSON message (docs/management-protocol.md).

use anyhow::{bail, Result};
use protection_groups::mgmt::{ManagerMessage, VdsaMessage, MAX_FRAME_BYTES};
use std::io::{Read, Write};

pub fn read_message(r: &mut impl Read) -> Result<ManagerMessage> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME_BYTES {
        bail!("a management frame of {len} bytes is over the limit of {MAX_FRAME_BYTES}");
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(serde_json::from_slice(&buf)?)
}

pub fn write_message(w: &mut impl Write, m: &VdsaMessage) -> Result<()> {
    let bytes = serde_json::to_vec(m)?;
    let Ok(len) = u32::try_from(bytes.len()) else { bail!("message too large") };
    if len > MAX_FRAME_BYTES {
        bail!("a management message of {len} bytes is over the limit of {MAX_FRAME_BYTES}");
    }
    let mut frame = Vec::with_capacity(bytes.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&bytes);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}
