//! Errors, by what a caller does about them.

use crate::moref::MoRef;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the user name or password.
    #[error("vCenter refused the login of user {user:?}: wrong user name or password")]
    InvalidLogin { user: String },
    /// The session is gone (never logged in, logged out, or expired).
    #[error("not logged in to vCenter (the session is missing or expired): {message}")]
    NotAuthenticated { message: String },
    /// The server no longer knows a managed object we named.
    #[error("vCenter has no object {obj}: it was removed or never existed")]
    ObjectNotFound { obj: MoRef },
    /// A name we looked up in the inventory is not there (a host, a
    /// datastore, a network…).
    #[error("no {kind} named {name} in the inventory{}", if .known.is_empty() { String::new() } else { format!(" (there are: {})", .known.join(", ")) })]
    NotFound { kind: &'static str, name: String, known: Vec<String> },
    /// The server rejected an argument.
    #[error("vCenter rejected an argument{}: {message}", .property.as_ref().map(|p| format!(" ({p})")).unwrap_or_default())]
    InvalidArgument { property: Option<String>, message: String },
    /// An object of that name exists already.
    #[error("{name:?} exists already")]
    AlreadyExists { name: String },
    /// A task ended in error; `fault` is the vim25 fault type.
    #[error("vCenter task {task} ({name}) failed: {fault}: {message}")]
    TaskFailed { task: MoRef, name: String, fault: String, message: String },
    /// Any other SOAP fault, by its vim25 type.
    #[error("vCenter answered {method} with fault {fault}: {message}")]
    Fault { method: String, fault: String, message: String },
    /// The server's certificate did not match what we trust.
    #[error("the TLS connection to {url} failed: {message}")]
    Tls { url: String, message: String },
    /// The certificate trust given is unusable (a CA file, a thumbprint):
    /// nothing was sent.
    #[error("bad certificate trust setting: {0}")]
    Trust(String),
    /// The vCenter URL given is unusable: nothing was sent.
    #[error("bad vCenter URL {url:?}: {message}")]
    BadUrl { url: String, message: String },
    /// The connection failed or dropped (refused, reset, timed out).
    #[error("the connection to {url} failed: {message}")]
    Connection { url: String, message: String },
    /// The server answered something that is not what vim25 says.
    #[error("the server's answer does not follow vim25: {0}")]
    Protocol(String),
    /// An OVA that is malformed or fails its manifest.
    #[error("bad OVA {path}: {message}")]
    Ova { path: String, message: String },
    /// Waiting for something took longer than allowed.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl Error {
    /// True when retrying the same call could succeed (the link dropped).
    pub fn is_connection(&self) -> bool {
        matches!(self, Error::Connection { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
