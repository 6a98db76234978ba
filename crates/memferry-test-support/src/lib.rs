//! Helpers shared by the integration tests of `memferry` and
//! `memferry-cli`: KV namespaces, patterned KV tensors and job results
//! ([`kv`]), file listings ([`files`]) and filesystems mounted for one test
//! ([`Mount`]).
//!
//! Dev-only: both crates list it under `[dev-dependencies]`; it is never
//! published and has no dependency beyond `memferry` and std.

pub mod files;
pub mod kv;
mod mount;

pub use mount::Mount;
