//! Reading `deploy/kubernetes/`'s manifests in tests (shared by the indexer's, relay's and
//! render node's tests through `#[path]`).

use std::path::{Path, PathBuf};

/// The manifest `name` in `deploy/kubernetes/`, from a crate directory of the workspace.
pub fn read(crate_dir: &str, name: &str) -> String {
    let path: PathBuf = Path::new(crate_dir).join("..").join("deploy/kubernetes").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `--flags` a manifest passes (comments left out).
pub fn flags(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',' | '"')))
        .filter(|t| t.starts_with("--") && t.chars().nth(2).is_some_and(|c| c.is_ascii_lowercase()))
        .map(str::to_owned)
        .collect()
}

/// Panics naming each flag of `manifest` that `binary --help` does not list.
pub fn assert_flags_exist(manifest: &str, binary: &str) {
    let help = std::process::Command::new(binary).arg("--help").output().unwrap_or_else(|e| panic!("{binary}: {e}"));
    let help = String::from_utf8_lossy(&help.stdout);
    let flags = flags(manifest);
    assert!(!flags.is_empty(), "the manifest passes no flags");
    for flag in flags {
        assert!(help.split_whitespace().any(|w| w == flag), "{binary} has no {flag}");
    }
}
