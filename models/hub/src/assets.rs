//! Where the test assets fetched by `scripts/fetch-assets` live.

use std::path::PathBuf;

use crate::HubError;

/// The asset cache: `$MICS_CACHE`, or `~/.cache/mics` when it is unset.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICS_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("mics")
}

/// The directory of one cached asset (`minilm`, `gpt2-tokenizer`, `tiny-gpt2`, ...).
///
/// Fails with [`HubError::MissingAsset`], naming the path and the setup command,
/// when the directory does not exist.
pub fn asset_dir(name: &str) -> Result<PathBuf, HubError> {
    let path = cache_dir().join(name);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(HubError::MissingAsset { path })
    }
}

/// One file inside a cached asset directory, failing like [`asset_dir`] when absent.
pub fn asset_file(name: &str, file: &str) -> Result<PathBuf, HubError> {
    let path = asset_dir(name)?.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HubError::MissingAsset { path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_asset_names_the_path_and_the_setup_command() {
        let err = asset_dir("no-such-asset-anywhere").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("no-such-asset-anywhere"), "{message}");
        assert!(message.contains("scripts/fetch-assets"), "{message}");
    }
}
