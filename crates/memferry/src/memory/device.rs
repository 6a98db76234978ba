//! Names of the devices memory can live on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A memory device: host RAM or a CUDA device by ordinal.
/// Written as `cpu` or `cuda:N` in manifests and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory.
    #[default]
    Cpu,
    /// CUDA device memory on the device with this ordinal.
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") || s.eq_ignore_ascii_case("host") {
            return Ok(Device::Cpu);
        }
        if let Some(n) = s.strip_prefix("cuda:")
            && let Ok(n) = n.parse()
        {
            return Ok(Device::Cuda(n));
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        Err(Error::InvalidInput(format!(
            "unknown device {s:?}: use cpu or cuda:N"
        )))
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
