//! Generates text with Shardline as a library: the model directory given (a Hugging Face
//! checkpoint) or the built-in demo model, greedy, streaming the text as it is written.
//!
//! cargo run --release -p shardline-model --example generate -- [MODEL_DIR] [PROMPT]

use std::io::Write;
use std::path::Path;

use shardline_model::{GenerateOptions, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut model = match args.next() {
        Some(dir) => Model::open(Path::new(&dir))?,
        None => Model::builtin()?,
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "Once upon a time".to_string());
    let opts = GenerateOptions {
        max_tokens: 32,
        ..GenerateOptions::default()
    };
    print!("{prompt}");
    let out = model.generate_streaming(&prompt, &opts, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    let t = &out.timings;
    eprintln!(
        "{} tokens, {:.2} ms per token after a {:.1} ms prompt",
        t.generated, t.decode_ms_per_token, t.prefill_ms
    );
    Ok(())
}
