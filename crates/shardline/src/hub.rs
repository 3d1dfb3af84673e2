//! `--model ORG/NAME`: a model already in the local Hugging Face cache (as `huggingface-cli
//! download` or transformers leave it), found through the `hf-hub` crate's cache layout. Nothing
//! is downloaded.

use std::path::{Path, PathBuf};

use hf_hub::Cache;

/// The directory `--model` names: `arg` itself when it exists, else the cached snapshot of the
/// Hugging Face repository `arg` when it reads as one (`ORG/NAME`).
pub fn resolve_model(arg: &Path) -> anyhow::Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().filter(|s| is_repo_id(s)) else {
        anyhow::bail!("the model {} does not exist", arg.display());
    };
    let hub = hub_dir().ok_or_else(|| {
        anyhow::anyhow!(
            "the model {id} does not exist: no such directory, and no Hugging Face cache to look \
             in (set HF_HOME or HF_HUB_CACHE)"
        )
    })?;
    let config = Cache::new(hub.clone())
        .model(id.to_string())
        .get("config.json");
    match config.as_deref().and_then(Path::parent) {
        Some(snapshot) => Ok(snapshot.to_path_buf()),
        None => anyhow::bail!(
            "the model {id} does not exist: no such directory, and no snapshot of a Hugging Face \
             repository {id} with a config.json in the cache {} (`huggingface-cli download {id}` \
             puts one there)",
            hub.display()
        ),
    }
}

/// `ORG/NAME` as the Hub spells repository ids: two non-empty parts of letters, digits, `-`,
/// `_` and `.`, neither starting with a dot.
fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if part(org) && part(name))
}

/// The cache's `hub` directory, as the Hugging Face libraries find it: `HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn hub_dir() -> Option<PathBuf> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(is_repo_id("Qwen/Qwen3-30B-A3B"));
        assert!(is_repo_id("mistralai/Mixtral-8x7B-v0.1"));
        for not in ["model", "a/b/c", "../x", "./x", "/abs", "a/", "org/na me"] {
            assert!(!is_repo_id(not), "{not}");
        }
    }
}
