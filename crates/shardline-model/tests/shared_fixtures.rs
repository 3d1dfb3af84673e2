//! `verify` on the independent fixtures in `/work/shared/fixtures` (or `$SHARDLINE_SHARED_FIXTURES`)
//! when that directory exists on this machine; says clearly that it skipped otherwise.

use std::path::PathBuf;

use shardline_model::verify_dir;

#[test]
fn verify_shared_fixtures_when_present() {
    let dir = std::env::var_os("SHARDLINE_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/fixtures"));
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: no shared fixtures at {} (set SHARDLINE_SHARED_FIXTURES)",
            dir.display()
        );
        return;
    }
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures under {}", dir.display());
    let mut failures = Vec::new();
    for fixture in &names {
        let r = verify_dir(fixture, None).unwrap();
        eprintln!("{}: {r:?}", fixture.display());
        if !r.passed() {
            failures.push(format!("{}: {r:?}", fixture.display()));
        }
    }
    assert!(failures.is_empty(), "verify failed: {failures:#?}");
}
