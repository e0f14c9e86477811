//! `config.json` files as Hugging Face writes them.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use crate::HubError;

/// Reads `config.json` in `dir` as `T`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, HubError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| HubError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| HubError::Config {
        path,
        reason: e.to_string(),
    })
}

/// The `model_type` field of `config.json` in `dir` (`"bert"`, `"gpt2"`, ...).
pub fn model_type(dir: &Path) -> Result<String, HubError> {
    let value: serde_json::Value = read_config(dir)?;
    match value.get("model_type").and_then(|v| v.as_str()) {
        Some(t) => Ok(t.to_string()),
        None => Err(HubError::Config {
            path: dir.join("config.json"),
            reason: "no string field `model_type`".into(),
        }),
    }
}

/// Writes `config` as pretty-printed `config.json` in `dir`, atomically.
pub fn write_config<T: Serialize>(dir: &Path, config: &T) -> Result<(), HubError> {
    let path = dir.join("config.json");
    let mut text = serde_json::to_string_pretty(config).map_err(|e| HubError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    crate::checkpoint::write_atomic(&path, text.as_bytes())
}
