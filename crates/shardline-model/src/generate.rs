//! Text generation: one prefill of the prompt, then one decode step per new token, streaming the
//! text as it grows, until EOS or the token limit.

use std::time::Instant;

use crate::backend::{Backend, Reduce};
use crate::engine::{Engine, Logits};
use crate::error::Result;
use crate::sampler::Sampler;
use crate::tokenizer::TextCodec;

/// How long a generation took.
#[derive(Clone, Debug)]
pub struct Timings {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Milliseconds from the start of prefill to the first generated token.
    pub prefill_ms: f64,
    /// Tokens generated (the stop token not counted).
    pub generated: usize,
    /// Mean time of one decode step (0 when there was none).
    pub decode_ms_per_token: f64,
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `emit` with each new piece of
/// text; stops early at any of `eos`. Returns the generated ids and the timings.
pub fn generate<B: Backend, R: Reduce>(
    engine: &mut Engine<B, R>,
    codec: &TextCodec,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut emit: impl FnMut(&str),
) -> Result<(Vec<u32>, Timings)> {
    // The last generated token is never fed back, so it needs no position.
    engine.start(prompt.len() + max_tokens.saturating_sub(1))?;
    let mut timings = Timings {
        prompt_tokens: prompt.len(),
        prefill_ms: 0.0,
        generated: 0,
        decode_ms_per_token: 0.0,
    };
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok((out, timings));
    }
    // Greedy decoding needs only the best id: a distributed argmax, no gathered logits.
    let mut step = |engine: &mut Engine<B, R>, tokens: &[u32]| -> Result<u32> {
        if sampler.is_greedy() {
            engine.forward_argmax(tokens)
        } else {
            let logits = engine.forward(tokens, Logits::Last)?;
            Ok(sampler.sample(&logits))
        }
    };
    let t0 = Instant::now();
    let mut next = step(engine, prompt)?;
    timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut stream = TextStream::default();
    let mut decode_s = 0.0;
    let mut decode_steps = 0usize;
    loop {
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        if let Some(piece) = stream.next(codec, &out)? {
            emit(&piece);
        }
        if out.len() == max_tokens {
            break;
        }
        let t = Instant::now();
        next = step(engine, &[next])?;
        decode_s += t.elapsed().as_secs_f64();
        decode_steps += 1;
    }
    timings.generated = out.len();
    timings.decode_ms_per_token = if decode_steps > 0 {
        decode_s * 1e3 / decode_steps as f64
    } else {
        0.0
    };
    Ok((out, timings))
}

/// Turns a growing list of ids into text pieces without decoding the whole list each time:
/// only the ids since the last piece, with the piece before them as context (a tokenizer's
/// decode of a token can depend on its neighbour: leading spaces, bytes of one character).
#[derive(Default)]
pub struct TextStream {
    /// Start of the context window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

/// Ids a stream holds back at most waiting for a character to be whole (UTF-8 takes at most 4
/// bytes, and byte-level tokens carry at least one).
const MAX_HELD: usize = 4;

impl TextStream {
    /// A stream at the start of a generation.
    pub fn new() -> TextStream {
        TextStream::default()
    }

    /// The new text that `ids` (the list so far) adds, if it ends on a whole character. A
    /// character's bytes come in at most [`MAX_HELD`] ids: past that the text goes out with its
    /// invalid bytes as U+FFFD, so a model emitting invalid UTF-8 still streams.
    pub fn next(&mut self, codec: &TextCodec, ids: &[u32]) -> Result<Option<String>> {
        let before = codec.decode(&ids[self.prefix..self.read])?;
        let now = codec.decode(&ids[self.prefix..])?;
        let split = now.ends_with('\u{FFFD}') && ids.len() - self.read < MAX_HELD;
        if now.len() <= before.len() || split {
            return Ok(None);
        }
        let piece = now.get(before.len()..).map(str::to_string);
        self.prefix = self.read;
        self.read = ids.len();
        Ok(piece)
    }

    /// The text of `ids` (the whole list, at the end of a generation) not yet returned by
    /// [`TextStream::next`]: the ids it held back, a character split at the end as U+FFFD.
    pub fn finish(&mut self, codec: &TextCodec, ids: &[u32]) -> Result<String> {
        let before = codec.decode(&ids[self.prefix..self.read])?;
        let now = codec.decode(&ids[self.prefix..])?;
        let rest = now.get(before.len()..).unwrap_or_default().to_string();
        self.prefix = ids.len();
        self.read = ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(codec: &TextCodec, ids: &[u32]) -> String {
        let mut stream = TextStream::default();
        let mut text = String::new();
        for n in 1..=ids.len() {
            if let Some(piece) = stream.next(codec, &ids[..n]).unwrap() {
                text.push_str(&piece);
            }
        }
        text
    }

    #[test]
    fn pieces_add_up_to_the_text_across_split_characters() {
        let text = "héllo wörld, ünïcode ✓ done";
        let bytes = TextCodec::Bytes;
        assert_eq!(streamed(&bytes, &bytes.encode(text).unwrap()), text);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/llama-tiny/tokenizer.json");
        let hf = TextCodec::from_file(&path).unwrap();
        let ids = hf.encode(text).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "byte-level: one id per byte"
        );
        assert_eq!(streamed(&hf, &ids), hf.decode(&ids).unwrap());
        assert_eq!(hf.decode(&ids).unwrap(), text);
    }

    #[test]
    fn finish_returns_the_held_back_tail() {
        let bytes = TextCodec::Bytes;
        let ids = bytes.encode("aé").unwrap();
        let mut stream = TextStream::new();
        let mut text = String::new();
        for n in 1..ids.len() {
            if let Some(piece) = stream.next(&bytes, &ids[..n]).unwrap() {
                text.push_str(&piece);
            }
        }
        assert_eq!(text, "a", "half of é is held back");
        assert_eq!(stream.finish(&bytes, &ids[..2]).unwrap(), "\u{FFFD}");
        assert_eq!(
            stream.finish(&bytes, &ids[..2]).unwrap(),
            "",
            "nothing twice"
        );
    }
}
