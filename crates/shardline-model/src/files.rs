//! Bounded reads of the small JSON files around a model (config, index, reference), so a huge or
//! wrong file gives an error instead of an unbounded allocation.

use std::io::Read;
use std::path::Path;

use crate::error::{ModelError, Result};

/// Reads and parses the JSON file at `path`, refusing files over `limit` bytes.
pub fn read_json(path: &Path, limit: u64) -> Result<serde_json::Value> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ModelError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(ModelError::config(
            path,
            format!("file is larger than {limit} bytes"),
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::config(path, format!("malformed JSON: {e}")))
}
