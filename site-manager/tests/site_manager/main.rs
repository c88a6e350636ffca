//! The site manager daemon, started as a real process over HTTPS: API
//! input checking, roles, tokens, the OpenAPI document against the served
//! routes, and restarts (clean and SIGKILL).

mod api;
mod cli;
mod daemon;
mod restart;
