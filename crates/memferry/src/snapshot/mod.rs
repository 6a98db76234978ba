//! Weight snapshots: layout, manifest (format v1), save, restore, verify,
//! gc and safetensors import/export; [`remote`] keeps snapshots in S3
//! buckets and [`copy`] moves them between any two locations.

pub mod copy;
pub mod export;
pub mod gc;
pub mod layout;
pub mod manifest;
pub mod open;
pub mod ownership;
pub mod placement;
pub mod remote;
pub mod report;
pub mod restore;
pub mod save;
pub mod source;

pub use gc::{GcReport, gc};
pub use manifest::Manifest;
pub use open::OpenedSnapshot;
pub use report::{Phases, Report};
pub use restore::{LoadOptions, RestoredSnapshot, restore, verify};
pub use save::{SaveOptions, save};
