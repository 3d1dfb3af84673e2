//! The tokenizer a GGUF carries in its metadata (`tokenizer.ggml.*`), rebuilt as the Hugging Face
//! `tokenizers::Tokenizer` it was converted from, so it encodes as llama.cpp does:
//!
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, with the pre-tokenizer named by
//!   `tokenizer.ggml.pre` (`gpt-2`; `llama-bpe`, Llama 3's; `qwen2`); others are refused by name.
//! - `llama`: SentencePiece BPE from `tokens` and `scores`. A merge joins two pieces into a third,
//!   ranked by the third's score (as llama.cpp's SPM tokenizer and transformers' conversion of a
//!   SentencePiece model rank them); spaces become `▁`, one prepended to the text
//!   (`add_space_prefix`, the default); unknown bytes fall back to `<0xXX>` tokens.
//!
//! Token types (`token_type`): control tokens become special added tokens (matched whole in the
//! text, skipped when decoding), user-defined ones plain added tokens. BOS (and EOS) are added when
//! `add_bos_token` (`add_eos_token`) says so; without the key, BOS is added for `llama` and
//! `llama-bpe`, as llama.cpp does. `tokenizer.chat_template` is carried as text.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use super::container::{GgufErrorKind, GgufFile, GgufFiles, Value};
use crate::error::{ModelError, Result};
use crate::tokenizer::TextCodec;

/// llama.cpp's token types.
const UNKNOWN: i128 = 2;
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;

/// GPT-2's split is the byte-level pre-tokenizer's own; these are the others (transformers'
/// `tokenizer.json` of Llama 3 and Qwen2).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's stand-in for a space.
const SPACE: &str = "\u{2581}";

/// The tokenizer of the model in `files`.
pub fn text_codec(files: &GgufFiles) -> Result<TextCodec> {
    let f = files.first();
    let json = tokenizer_json(f)?;
    let t: tokenizers::Tokenizer = json.to_string().parse().map_err(|e| tok_err(f, e))?;
    Ok(TextCodec::Hf(Box::new(t)))
}

/// `tokenizer.chat_template`, the Jinja template of a chat model.
pub fn chat_template(files: &GgufFiles) -> Result<Option<String>> {
    Ok(files
        .first()
        .str("tokenizer.chat_template")?
        .map(str::to_string))
}

/// The text of the BOS and EOS tokens (`tokenizer.ggml.bos_token_id`, `eos_token_id`), which a
/// chat template may print.
pub fn bos_eos_text(files: &GgufFiles) -> Result<[Option<String>; 2]> {
    let f = files.first();
    let tokens = f.array("tokenizer.ggml.tokens")?.unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>> {
        let Some(id) = f.u64(key)? else {
            return Ok(None);
        };
        match usize::try_from(id).ok().and_then(|i| tokens.get(i)) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(tok_err(f, format!("{key} ({id}) names no token"))),
        }
    };
    Ok([
        text("tokenizer.ggml.bos_token_id")?,
        text("tokenizer.ggml.eos_token_id")?,
    ])
}

fn tok_err(f: &GgufFile, reason: impl ToString) -> ModelError {
    ModelError::Tokenizer {
        path: f.path().to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The elements of array `key`, each checked by `get` (which names the expected type).
fn elements<'a, T>(
    f: &'a GgufFile,
    key: &str,
    expected: &'static str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(items) = f.array(key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|v| {
            get(v).ok_or_else(|| {
                f.error(GgufErrorKind::KeyType {
                    key: key.to_string(),
                    expected,
                    found: v.type_name(),
                })
                .into()
            })
        })
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

/// The tokenizer as transformers' `tokenizer.json`.
fn tokenizer_json(f: &GgufFile) -> Result<Json> {
    let key = "tokenizer.ggml.model";
    let model = f.require(key, f.str(key))?;
    let key = "tokenizer.ggml.tokens";
    let tokens = elements(f, key, "an array of strings", Value::as_str)?.ok_or_else(|| {
        f.error(GgufErrorKind::MissingKey {
            key: key.to_string(),
        })
    })?;
    let n = tokens.len();
    let types = elements(
        f,
        "tokenizer.ggml.token_type",
        "an array of integers",
        Value::as_i128,
    )?
    .unwrap_or_else(|| vec![1; n]);
    if types.len() != n {
        return Err(tok_err(
            f,
            format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            ),
        ));
    }
    let id = |key: &str| -> Result<Option<usize>> {
        match f.u64(key)? {
            Some(id) if id < n as u64 => Ok(Some(id as usize)),
            Some(id) => Err(tok_err(f, format!("{key} is {id}, outside the {n} tokens"))),
            None => Ok(None),
        }
    };
    let (bos, eos) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
    );
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Json> = (0..n)
        .filter(|&i| types[i] == CONTROL || types[i] == USER_DEFINED)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": types[i] == CONTROL})
        })
        .collect();
    let (model, normalizer, pre_tokenizer, decoder, default_bos) = match model {
        "gpt2" => {
            let pre = f.str("tokenizer.ggml.pre")?.unwrap_or("default");
            let byte_level = |use_regex: bool| {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                       "use_regex": use_regex})
            };
            let split = |regex: &str| {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
                     "invert": false},
                    byte_level(false)]})
            };
            let (pre_tokenizer, ignore_merges, default_bos) = match pre {
                "gpt-2" => (byte_level(true), false, false),
                "llama-bpe" | "llama3" | "llama-v3" => (split(LLAMA3_SPLIT), true, true),
                "qwen2" => (split(QWEN2_SPLIT), false, false),
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{}: BPE pre-tokenizer `{other}` (tokenizer.ggml.pre); known: gpt-2, llama-bpe, qwen2",
                        f.path().display()
                    )))
                }
            };
            let merges = elements(
                f,
                "tokenizer.ggml.merges",
                "an array of strings",
                Value::as_str,
            )?
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                split_merge(m).ok_or_else(|| tok_err(f, format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
            let model = json!({"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab,
                "merges": merges});
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true});
            (model, Json::Null, pre_tokenizer, decoder, default_bos)
        }
        "llama" => {
            let key = "tokenizer.ggml.scores";
            let scores =
                elements(f, key, "an array of floats", Value::as_f64)?.ok_or_else(|| {
                    f.error(GgufErrorKind::MissingKey {
                        key: key.to_string(),
                    })
                })?;
            if scores.len() != n {
                return Err(tok_err(
                    f,
                    format!("{key} has {} entries for {n} tokens", scores.len()),
                ));
            }
            let unk = match id("tokenizer.ggml.unknown_token_id")? {
                Some(i) => Some(i),
                None => types.iter().position(|&t| t == UNKNOWN),
            };
            let model = json!({"type": "BPE", "dropout": null,
                "unk_token": unk.map(|i| tokens[i]), "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab,
                "merges": spm_merges(&tokens, &scores)});
            let prefix = f.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
            let mut normalizers = vec![replace(" ", SPACE)];
            let mut decoders = vec![
                replace(SPACE, " "),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                normalizers.insert(0, json!({"type": "Prepend", "prepend": SPACE}));
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                model,
                json!({"type": "Sequence", "normalizers": normalizers}),
                Json::Null,
                json!({"type": "Sequence", "decoders": decoders}),
                true,
            )
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "{}: tokenizer model `{other}` (tokenizer.ggml.model); known: gpt2, llama",
                f.path().display()
            )))
        }
    };
    let add_bos = f
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_bos);
    let add_eos = f.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let mut specials = Vec::new();
    if add_bos {
        specials.extend(bos.map(|i| (0, i)));
    }
    if add_eos {
        specials.extend(eos.map(|i| (1, i)));
    }
    let post_processor = if specials.is_empty() {
        Json::Null
    } else {
        let piece = |seq: &str| -> Vec<Json> {
            let mut p: Vec<Json> = specials
                .iter()
                .filter(|s| s.0 == 0)
                .map(|&(_, i)| json!({"SpecialToken": {"id": tokens[i], "type_id": 0}}))
                .collect();
            p.push(json!({"Sequence": {"id": seq, "type_id": 0}}));
            p.extend(
                specials
                    .iter()
                    .filter(|s| s.0 == 1)
                    .map(|&(_, i)| json!({"SpecialToken": {"id": tokens[i], "type_id": 0}})),
            );
            p
        };
        let special_tokens: serde_json::Map<String, Json> = specials
            .iter()
            .map(|&(_, i)| {
                (
                    tokens[i].to_string(),
                    json!({"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}),
                )
            })
            .collect();
        let pair = [piece("A"), piece("B")].concat();
        json!({"type": "TemplateProcessing", "single": piece("A"), "pair": pair,
               "special_tokens": special_tokens})
    };
    Ok(
        json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor, "decoder": decoder, "model": model}),
    )
}

/// A GGUF merge, `"left right"`, as a pair (llama.cpp splits at the first space after the
/// first character).
fn split_merge(m: &str) -> Option<[&str; 2]> {
    let first = m.chars().next()?.len_utf8();
    let at = first + m[first..].find(' ')?;
    Some([&m[..at], &m[at + 1..]])
}

/// The merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, ranked
/// by the joined piece's score, highest first (ties keep the order of the joined piece's id, then
/// the parts' ids), as transformers derives them from a SentencePiece model.
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<[String; 2]> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let start = merges.len();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[id], li, ri, l, r));
            }
        }
        merges[start..].sort_by_key(|m| (m.1, m.2));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|m| [m.3.to_string(), m.4.to_string()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_space() {
        assert_eq!(split_merge("Ġ t"), Some(["Ġ", "t"]));
        assert_eq!(split_merge("  x"), Some([" ", "x"]));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn spm_merges_rank_by_the_joined_score() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let m = spm_merges(&tokens, &scores);
        let m: Vec<String> = m.iter().map(|[l, r]| format!("{l} {r}")).collect();
        // bc (-1) before ab (-2) before abc's two splits (-3), those in part-id order.
        assert_eq!(m, ["b c", "a b", "a bc", "ab c"]);
    }
}
