//! An ed25519 key (the indexer's token key, a node's or relay's identity), generated on
//! first start and kept (mode 0600) in the data directory.

use ed25519_dalek::SigningKey;
use std::path::Path;

/// Key file errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the key failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a 32-byte key.
    #[error("key file {0} is corrupt (expected 32 bytes)")]
    Corrupt(String),
    /// No randomness available.
    #[error("no randomness to make a key: {0}")]
    Random(String),
}

/// Loads `name` from `dir`, or creates a fresh key there.
pub fn load_or_create(dir: &Path, name: &str) -> Result<SigningKey, KeyError> {
    let path = dir.join(name);
    let io = |source| KeyError::Io { path: path.display().to_string(), source };
    if path.exists() {
        let bytes = std::fs::read(&path).map_err(io)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Corrupt(path.display().to_string()))?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(&path).and_then(|mut f| f.write_all(&seed)).map_err(io)?;
    tracing::info!(path = %path.display(), "created a new key");
    Ok(SigningKey::from_bytes(&seed))
}
