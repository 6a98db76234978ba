//! KV-cache blocks at rest (foundation; the job engine, lookup index and
//! eviction build on these pieces).
//!
//! - [`namespace`]: which model/parallelism/dtype a block belongs to, and
//!   the directory that keeps namespaces apart;
//! - [`key`]: block keys (opaque hashes) and where their files live;
//! - [`format`]: the block file: a 4096-byte header, then the payload;
//! - [`tensors`]: the engine's registered KV tensors and the block-major
//!   gather/scatter between them and a payload.

pub mod format;
pub mod key;
pub mod namespace;
pub mod tensors;

pub use format::{BlockHeader, HEADER_BYTES};
pub use key::BlockKey;
pub use namespace::Namespace;
pub use tensors::{KvLayout, KvTensor};
