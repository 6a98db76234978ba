//! memferry: move large memory state between (accelerator) memory and
//! storage, fast and safely.
//!
//! - [`memory`]: where bytes live in RAM (and, later, VRAM);
//! - [`storage`]: where bytes live at rest and how files are published;
//! - [`transfer`]: how bytes move (one backend trait, one module per backend);
//! - [`snapshot`]: the weight-snapshot format, save, restore, verify, gc.

pub mod error;
pub mod integrity;
pub mod memory;
pub mod storage;
pub mod transfer;
pub mod units;

pub use error::{Error, Result};
pub mod bench;
pub mod kv;
pub mod snapshot;
