//! `verify` on the fixtures of an extra fixtures directory, `$SHARDLINE_SHARED_FIXTURES`
//! (default `shared/fixtures` beside the checkout), when that directory exists on this machine;
//! says clearly that it skipped otherwise.
//!
//! Their `mixtral-tiny-bf16` reference was computed with rope inverse frequencies rounded to bf16
//! (a model cast with its buffers), unlike the repo's fixtures; so each fixture must pass under
//! one of the two rope conventions, and the test prints which.

use std::path::{Path, PathBuf};

use shardline_model::verify_dir;

#[test]
fn verify_shared_fixtures_when_present() {
    let dir = std::env::var_os("SHARDLINE_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // `shared/` sits beside the repository's checkout.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    if !dir.is_dir() {
        eprintln!(
            "SKIPPED: no shared fixtures at {} (set SHARDLINE_SHARED_FIXTURES)",
            dir.display()
        );
        return;
    }
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    fixtures.sort();
    assert!(!fixtures.is_empty(), "no fixtures under {}", dir.display());
    let mut failures = Vec::new();
    for fixture in &fixtures {
        let f32_rope = verify_dir(fixture, None, false).unwrap();
        eprintln!("{} (f32 rope freqs): {f32_rope:?}", fixture.display());
        if f32_rope.passed() {
            continue;
        }
        let model_rope = verify_dir(fixture, None, true).unwrap();
        eprintln!(
            "{} (rope freqs in model dtype): {model_rope:?}",
            fixture.display()
        );
        if !model_rope.passed() {
            failures.push(format!(
                "{}: {f32_rope:?} / {model_rope:?}",
                fixture.display()
            ));
        }
    }
    assert!(failures.is_empty(), "verify failed: {failures:#?}");
}
