//! The Kubernetes manifests in `deploy/kubernetes/` are valid against the Kubernetes API's
//! own schemas, strictly (an unknown field is an error), by `kubernetes-validate` from PyPI
//! (installed by `deploy/python-tools.sh`, found through `PYLON_PYTHON_TOOLS`); and the
//! indexer's manifest passes it only flags the binary has. (The relay's and render node's
//! manifests are held to their binaries in those crates' `cli` tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod manifest;

use std::path::{Path, PathBuf};
use std::process::Command;

fn validator() -> PathBuf {
    let dir = PathBuf::from(std::env::var("PYLON_PYTHON_TOOLS").unwrap_or_else(|_| "/var/tmp/pylon-venv/bin".into()));
    let tool = dir.join("kubernetes-validate");
    assert!(
        tool.exists(),
        "kubernetes-validate not found in {}: run `bash deploy/python-tools.sh` (make test does)",
        dir.display()
    );
    tool
}

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new(validator()).arg("--strict").args(files).output().unwrap()
}

#[test]
fn every_manifest_is_valid_kubernetes_and_a_broken_one_is_not() {
    let files = manifests();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["namespace.yaml", "indexer.yaml", "relay.yaml", "render-node.yaml", "checker.yaml"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from deploy/kubernetes: {names:?}");
    }
    let out = validate(&files);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate refused the manifests:\n{text}");
    // Every resource was checked (a file it could not read would say nothing).
    assert_eq!(text.matches(" passed for resource ").count(), 8, "{text}");

    // The validator is strict: a misspelt field fails.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let relay = std::fs::read_to_string(files.iter().find(|f| f.ends_with("relay.yaml")).unwrap()).unwrap();
    std::fs::write(&broken, relay.replace("hostNetwork: true", "hostNetwrok: true")).unwrap();
    let out = validate(&[broken]);
    assert!(!out.status.success(), "a misspelt field passed: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_indexer_manifest_passes_only_flags_the_indexer_has() {
    manifest::assert_flags_exist(
        &manifest::read(env!("CARGO_MANIFEST_DIR"), "indexer.yaml"),
        env!("CARGO_BIN_EXE_pylon-indexer"),
    );
}
