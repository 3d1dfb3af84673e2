//! `verify` on every fixture committed under `<workspace>/fixtures` (made by
//! `scripts/make_fixtures.py` with transformers), in process.

use std::path::PathBuf;

use shardline_model::verify_dir;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn check(name: &str) {
    let dir = fixtures_dir().join(name);
    let r = verify_dir(&dir, None, false).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {r:?}");
    assert!(r.greedy_total >= 2, "{name}: too few greedy steps checked");
    assert!(r.passed(), "{name}: {r:?}");
}

#[test]
fn mixtral_tiny() {
    check("mixtral-tiny");
}

#[test]
fn mixtral_tiny_bf16() {
    check("mixtral-tiny-bf16");
}

#[test]
fn mixtral_tiny_f16() {
    check("mixtral-tiny-f16");
}

#[test]
fn qwen2_moe_tiny() {
    check("qwen2-moe-tiny");
}

#[test]
fn qwen3_moe_tiny() {
    check("qwen3-moe-tiny");
}

#[test]
fn llama_tiny() {
    check("llama-tiny");
}

#[test]
fn every_fixture_directory_has_a_test() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "llama-tiny",
            "mixtral-tiny",
            "mixtral-tiny-bf16",
            "mixtral-tiny-f16",
            "qwen2-moe-tiny",
            "qwen3-moe-tiny"
        ]
    );
}
