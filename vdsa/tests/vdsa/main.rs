//! The appliance's tests: the journal engine against a reference model,
//! its corruption and edge cases, and the NBD tap server under random and
//! hostile input.

mod daemon;
mod encryption_signal;
mod journal;
mod native_tap;
mod nbd;
mod recovery;
mod shared_store;
mod source;
mod wire;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use vdsa::conn_limit::{ConnectionLimit, MAX_TAP_CONNECTIONS};
use vdsa::nbd::export::Exports;
use vdsa::serving::{accept_each, Listener, Pool, Protocol};

/// Serves `exports` on a Unix socket at `sock` with `protocol` (the NBD
/// server or the native tap protocol), as a VDSA does: on the connection
/// runtime.
fn serve_exports(sock: &Path, exports: Exports, protocol: Protocol) {
    let listener = UnixListener::bind(sock).unwrap_or_else(|e| panic!("{e}"));
    let limit = ConnectionLimit::new(MAX_TAP_CONNECTIONS, "test connections");
    accept_each(Listener::Unix(listener), Arc::new(exports), limit, Pool::Taps, protocol, "test connections")
        .unwrap_or_else(|e| panic!("{e}"));
}
