//! Text <-> token ids: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or the
//! built-in byte-level codec of the demo model (token id = byte value).

use std::path::Path;

use crate::error::{ModelError, Result};

/// A model's tokenizer: encodes prompts and decodes generated ids.
pub enum TextCodec {
    /// A Hugging Face tokenizer (from `tokenizer.json`, or built from a GGUF's vocabulary).
    Hf(Box<tokenizers::Tokenizer>),
    /// One token per byte; vocabulary of 256.
    Bytes,
}

impl TextCodec {
    /// Loads `path` (a `tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<TextCodec> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(TextCodec::Hf(Box::new(t)))
    }

    /// The ids of `text`, with the special tokens the tokenizer adds (a BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// The ids of a rendered chat template, which holds its special tokens already (as
    /// transformers encodes it: no BOS added).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self {
            TextCodec::Hf(t) => t
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Invalid(format!("cannot tokenize the prompt: {e}"))),
            TextCodec::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// The text of `ids`; bytes that are not (yet) valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            TextCodec::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| ModelError::Invalid(format!("cannot detokenize: {e}"))),
            TextCodec::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let c = TextCodec::Bytes;
        let ids = c.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(c.decode(&ids).unwrap(), "héllo");
        assert_eq!(c.decode(&ids[..2]).unwrap(), "h\u{FFFD}");
    }
}
