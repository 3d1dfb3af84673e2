//! Bad input (issue 4 item 7): each case copies a repo fixture to a temp dir, breaks one thing,
//! and checks that loading fails with an error naming the file and the tensor or setting.

use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use shardline_model::{load_dir, load_tokenizer, Backend, Engine, Logits};

use crate::common::checkpoint::{edit_config, edit_weights};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral-tiny")
}

/// A temp copy of the mixtral-tiny fixture.
fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_dir(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error `{err}` does not mention `{n}`");
    }
}

#[test]
fn missing_config() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "cannot read"]);
}

#[test]
fn malformed_config() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "malformed JSON"]);
}

#[test]
fn config_missing_or_wrong_setting() {
    let dir = copy_fixture();
    edit_config(dir.path(), |c| {
        c.remove("num_local_experts");
    });
    assert_mentions(&load_err(dir.path()), &["config.json", "num_local_experts"]);
    edit_config(dir.path(), |c| {
        c.insert("num_local_experts".into(), "four".into());
    });
    assert_mentions(&load_err(dir.path()), &["config.json", "num_local_experts"]);
}

#[test]
fn unknown_architecture() {
    let dir = copy_fixture();
    edit_config(dir.path(), |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "GPT2LMHeadModel", "unknown architecture"],
    );
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| e.0 != Q);
    assert_mentions(&load_err(dir.path()), &[Q, "missing"]);
}

#[test]
fn wrong_shape() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q {
            // Drop the last row.
            let row_bytes = e.3.len() / e.2[0];
            e.2[0] -= 1;
            e.3.truncate(e.3.len() - row_bytes);
        }
        true
    });
    assert_mentions(&load_err(dir.path()), &[Q, "model.safetensors", "shape"]);
}

#[test]
fn wrong_dtype() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |e| {
        if e.0 == Q {
            e.1 = Dtype::I32;
        }
        true
    });
    assert_mentions(&load_err(dir.path()), &[Q, "model.safetensors", "I32"]);
}

#[test]
fn truncated_weights() {
    let dir = copy_fixture();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "safetensors"]);
    // Shorter than the 8-byte header length.
    f.set_len(3).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn prompt_longer_than_max_positions() {
    let mut engine: Engine<_, _> = load_dir(&fixture()).unwrap();
    let err = engine.start(129).unwrap_err().to_string();
    assert_mentions(&err, &["max_position_embeddings", "128", "129"]);
    // A forward pass past the started length is refused too, never a panic.
    engine.start(4).unwrap();
    let err = engine
        .forward(&[1; 5], Logits::Last)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["KV cache"]);
    let err = engine
        .forward(&[300], Logits::Last)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["300", "vocab"]);
}

#[test]
fn unreadable_tokenizer() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 5}").unwrap();
    let err = load_tokenizer(dir.path()).err().unwrap().to_string();
    assert_mentions(&err, &["tokenizer.json", "cannot load the tokenizer"]);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_tokenizer(dir.path()).err().unwrap().to_string();
    assert_mentions(&err, &["tokenizer.json"]);
}

#[test]
fn sharded_index_loads_and_bad_index_is_named() {
    let dir = copy_fixture();
    let p = dir.path();
    std::fs::rename(p.join("model.safetensors"), p.join("part-1.safetensors")).unwrap();
    let bytes = std::fs::read(p.join("part-1.safetensors")).unwrap();
    let names: Vec<String> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| (n.clone(), "part-1.safetensors".into()))
        .collect();
    let index = p.join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    assert!(load_dir(p).is_ok());
    std::fs::write(&index, "{\"weight_map\": 3}").unwrap();
    assert_mentions(
        &load_err(p),
        &["model.safetensors.index.json", "weight_map"],
    );
}

#[test]
fn generation_config_adds_eos_ids_and_is_checked() {
    let dir = copy_fixture();
    let path = dir.path().join("generation_config.json");
    std::fs::write(&path, "{\"eos_token_id\": [2, 7]}").unwrap();
    let engine = load_dir(dir.path()).unwrap();
    assert_eq!(engine.backend.spec().eos_ids, [2, 7]);
    std::fs::write(&path, "{\"eos_token_id\": \"end\"}").unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["generation_config.json", "eos_token_id"],
    );
}

#[test]
fn sequence_longer_than_an_enabled_sliding_window() {
    let dir = copy_fixture();
    edit_config(dir.path(), |c| {
        c.insert("sliding_window".into(), 16.into());
    });
    let mut engine = load_dir(dir.path()).unwrap();
    engine.start(16).unwrap();
    let err = engine.start(17).unwrap_err().to_string();
    assert_mentions(&err, &["sliding_window (16)", "17"]);
}

#[test]
fn config_numbers_that_mean_nothing_are_refused() {
    for (key, value, says) in [
        ("rms_norm_eps", serde_json::json!(-1e-5), "rms_norm_eps"),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": 0.0, "rope_type": "default"}),
            "rope_theta",
        ),
        (
            "num_hidden_layers",
            serde_json::json!(0),
            "num_hidden_layers is 0",
        ),
    ] {
        let dir = copy_fixture();
        edit_config(dir.path(), |c| {
            c.insert(key.into(), value.clone());
        });
        assert_mentions(&load_err(dir.path()), &["config.json", says]);
    }
}

#[test]
fn fewer_layers_in_the_config_than_in_the_weights_is_refused() {
    let dir = copy_fixture();
    edit_config(dir.path(), |c| {
        c.insert("num_hidden_layers".into(), 1.into());
    });
    assert_mentions(
        &load_err(dir.path()),
        &["num_hidden_layers is 1", "model.layers.1."],
    );
}

#[test]
fn nan_weights_fail_naming_the_position_instead_of_printing_nothing() {
    let dir = copy_fixture();
    edit_weights(dir.path(), |(name, dtype, _, bytes)| {
        if name == Q {
            assert_eq!(*dtype, Dtype::F32);
            for v in bytes.chunks_exact_mut(4) {
                v.copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        true
    });
    let mut engine = load_dir(dir.path()).unwrap();
    engine.start(8).unwrap();
    let err = engine.forward_argmax(&[1, 2, 3]).unwrap_err().to_string();
    assert_mentions(&err, &["non-finite", "position"]);
}
