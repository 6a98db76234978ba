//! Where bytes live at rest: files under one or several roots, how they are
//! read and written (short transfers resumed), and how a set of files is
//! published atomically and durably; or objects in an S3-compatible bucket
//! ([`s3`]), addressed by a [`location::Location`].

pub mod durable;
pub mod file_io;
pub mod location;
pub mod roots;
pub mod s3;
