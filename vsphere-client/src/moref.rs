//! The managed object reference, the one vim25 type that every other part
//! of the client (requests, replies, errors) names.

/// A managed object reference: the server's handle on an object. Its value
/// is opaque (vcsim's datastore values are file paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> Self {
        MoRef { kind: kind.to_string(), value: value.to_string() }
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}
