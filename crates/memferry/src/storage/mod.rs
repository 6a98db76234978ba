//! Where bytes live at rest: files under one or several roots, how they are
//! read and written (short transfers resumed), and how a set of files is
//! published atomically and durably.

pub mod durable;
pub mod file_io;
pub mod roots;
