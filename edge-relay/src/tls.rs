//! The relay's QUIC identity: a self-signed certificate generated on first start and
//! kept in the data directory, so render nodes can pin it across relay restarts.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Certificate and key of the relay.
#[derive(Debug)]
pub struct Identity {
    /// DER certificate.
    pub cert: Vec<u8>,
    /// DER PKCS#8 private key.
    pub key: Vec<u8>,
    /// Where the certificate is stored (what nodes pass as `--relay-cert`).
    pub cert_path: PathBuf,
}

/// Names the certificate is issued to.
pub const CERT_NAMES: [&str; 2] = ["pylon-relay", "localhost"];

/// Loads `relay-cert.der`/`relay-key.der` from `dir`, creating them on first start.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Identity> {
    let cert_path = dir.join("relay-cert.der");
    let key_path = dir.join("relay-key.der");
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
        let key = std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        return Ok(Identity { cert, key, cert_path });
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    let generated = rcgen::generate_simple_self_signed(CERT_NAMES.map(String::from).to_vec())?;
    let cert = generated.cert.der().to_vec();
    let key = generated.key_pair.serialize_der();
    write_private(&key_path, &key)?;
    std::fs::write(&cert_path, &cert).with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(path = %cert_path.display(), "created the relay certificate");
    Ok(Identity { cert, key, cert_path })
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("pylon-tls-{}", std::process::id()));
        let a = load_or_create(&dir).unwrap();
        let b = load_or_create(&dir).unwrap();
        assert_eq!(a.cert, b.cert);
        assert_eq!(a.key, b.key);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
