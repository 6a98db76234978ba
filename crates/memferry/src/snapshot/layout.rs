//! The allocation layout of a model's memory: what a restore recreates, in
//! order, before any byte moves.

use serde::{Deserialize, Serialize};

use crate::memory::Device;

/// One allocation, recreated at restore in layout order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Identifier, unique within the layout.
    pub id: u64,
    /// Size in bytes (any value, 0 included).
    pub size: u64,
    /// Device the allocation lives on.
    pub device: Device,
    /// Free-form label (e.g. `weights`, `tensor`).
    pub tag: String,
}

/// A metadata entry pointing into an allocation (e.g. a tensor's name,
/// dtype and shape), as in GMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataEntry {
    /// Unique key.
    pub key: String,
    /// Allocation the entry refers to.
    pub allocation_id: u64,
    /// Byte offset inside that allocation.
    pub offset: u64,
    /// Opaque value bytes (base64 in the manifest).
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
}

/// Allocations in order plus metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Allocations, in the order restore recreates them.
    pub allocations: Vec<Allocation>,
    /// Metadata entries.
    pub metadata: Vec<MetadataEntry>,
}

impl Layout {
    /// Total bytes of all allocations.
    pub fn total_bytes(&self) -> u64 {
        self.allocations.iter().map(|a| a.size).sum()
    }

    /// Checks ids are unique and metadata points inside allocations.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::HashMap::new();
        for (i, a) in self.allocations.iter().enumerate() {
            if ids.insert(a.id, i).is_some() {
                return Err(format!("allocation id {} appears twice", a.id));
            }
        }
        let mut keys = std::collections::HashSet::new();
        for m in &self.metadata {
            if !keys.insert(m.key.as_str()) {
                return Err(format!("metadata key {:?} appears twice", m.key));
            }
            let Some(&i) = ids.get(&m.allocation_id) else {
                return Err(format!(
                    "metadata {:?} names allocation {} which does not exist",
                    m.key, m.allocation_id
                ));
            };
            if m.offset > self.allocations[i].size {
                return Err(format!(
                    "metadata {:?} points past the end of allocation {}",
                    m.key, m.allocation_id
                ));
            }
        }
        Ok(())
    }
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
