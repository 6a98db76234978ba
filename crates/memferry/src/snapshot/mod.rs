//! Weight snapshots: layout, manifest (format v1), save, restore, verify,
//! gc and safetensors import/export.

pub mod export;
pub mod layout;
pub mod source;
