//! A vim25 SOAP client for vCenter and ESXi, built on quick-xml and reqwest.
//!
//! It will own sessions, inventory retrieval, tasks, OVF/OVA import with NFC
//! lease upload, VM create/reconfigure/power/destroy and port groups, with
//! SOAP faults mapped to typed errors.
//!
//! It must not know about protection groups or replication: it is a client
//! of one API, used by the site manager and the operator command.
