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

/// verify must notice a logit off by twice the tolerance, and a greedy id that differs.
#[test]
fn verify_detects_wrong_logits_and_wrong_greedy_ids() {
    let dir = fixtures_dir().join("mixtral-tiny");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("reference.json");
    let check = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = original.clone();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        verify_dir(&dir, Some(&path), false).unwrap()
    };
    let bump = |v: &mut serde_json::Value, key: &str, row: usize| {
        let x = &mut v[key][row][17];
        *x = (x.as_f64().unwrap() + 2e-4).into();
    };
    let r = check(&|v| bump(v, "prefill_logits", 3));
    assert!(!r.passed() && r.prefill_worst_position == 3, "{r:?}");
    assert!(
        r.prefill_max_diff > 1.5e-4 && r.decode_max_diff < 1e-4,
        "{r:?}"
    );
    let r = check(&|v| bump(v, "decode_logits", 5));
    assert!(!r.passed() && r.decode_worst_step == 5, "{r:?}");
    let r = check(&|v| {
        let id = &mut v["greedy_ids"][4];
        *id = ((id.as_u64().unwrap() + 1) % 256).into();
    });
    assert!(!r.passed(), "{r:?}");
    assert!(r.greedy_agree < r.greedy_total, "{r:?}");
    // The unedited reference passes through the same path.
    assert!(check(&|_| {}).passed());
}
