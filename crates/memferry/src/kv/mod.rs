//! KV-cache blocks at rest and the store that moves them.
//!
//! - [`namespace`]: which model/parallelism/dtype a block belongs to, and
//!   the directory that keeps namespaces apart;
//! - [`key`]: block keys (opaque hashes) and where their files live;
//! - [`format`](mod@format): the block file: a 4096-byte header, then the payload;
//! - [`tensors`]: the engine's registered KV tensors and the block-major
//!   gather/scatter between them and a payload;
//! - [`store`]: the asynchronous job engine ([`KvStore`]): lookup, load,
//!   store, touch, protect, eviction, counters;
//! - [`admin`]: what operators run on a whole KV root (stats, evict,
//!   verify), without opening a store.
//!
//! Internals: `backing` is where blocks live at rest (files moved through
//! the transfer backends, or S3 objects), `codec` turns pages into a block
//! image and back, `index` is the in-memory view of what is stored, `scan`
//! walks a namespace directory, `access` is the on-disk access record used
//! for LRU.

pub mod access;
pub mod admin;
mod backing;
mod codec;
pub mod config;
pub mod format;
mod index;
pub mod job;
pub mod key;
pub mod namespace;
pub mod scan;
pub mod stats;
pub mod store;
pub mod tensors;

pub use config::KvConfig;
pub use format::{BlockHeader, HEADER_BYTES};
pub use job::{JobId, JobKind, JobResult, KeyOutcome, KeyResult};
pub use key::BlockKey;
pub use namespace::Namespace;
pub use stats::Counters;
pub use store::{KvStats, KvStore};
pub use tensors::{KvLayout, KvTensor};
