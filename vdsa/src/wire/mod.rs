//! The replication link between a source and a target VDSA: frames,
//! messages and the TLS 1.3 transport (architecture.md §5, docs/wire-protocol.md).

pub mod async_link;
pub mod frame;
pub mod msg;
pub mod tls;

pub use frame::{read_frame, write_frame, Frame, FrameError, VERSION};
