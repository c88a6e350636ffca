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

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use vdsa::nbd::server::Exports;

/// Serves `exports` on a Unix socket at `sock`, a thread per connection,
/// with `session` (the NBD server or the native tap protocol).
fn serve_exports(sock: &Path, exports: Exports, session: fn(UnixStream, UnixStream, &Exports)) {
    let listener = UnixListener::bind(sock).unwrap_or_else(|e| panic!("{e}"));
    let exports = Arc::new(exports);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let exports = exports.clone();
            std::thread::spawn(move || {
                if let Ok(r) = conn.try_clone() {
                    session(r, conn, &exports);
                }
            });
        }
    });
}
