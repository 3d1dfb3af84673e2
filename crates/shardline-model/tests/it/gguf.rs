//! GGUF models: the repo fixtures converted as llama.cpp's converter lays them out
//! (`scripts/make_gguf_fixture.py`, committed under `fixtures/NAME-gguf/`) must give the spec,
//! tokenizer and logits of the Hugging Face originals in `fixtures/NAME`; hostile files fail with
//! typed errors naming the file and the field, and random corruptions never panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use proptest::prelude::*;
use shardline_model::gguf::{
    model_spec, tokenizer, GgufErrorKind, GgufFile, GgufFiles, GgufModel, GgufTensors,
};
use shardline_model::load::load_model;
use shardline_model::tokenizer::TextCodec;
use shardline_model::weights::TensorSource;
use shardline_model::{
    load_parts, verify, CpuBackend, Engine, ModelError, Plan, Reference, SingleRank,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The GGUF of fixture `name` (the first shard of a split one).
fn gguf_path(name: &str) -> PathBuf {
    let dir = fixtures().join(format!("{name}-gguf"));
    let single = dir.join("model.gguf");
    if single.is_file() {
        single
    } else {
        dir.join("model-00001-of-00003.gguf")
    }
}

/// Spec, logits and tokenizer of `fixtures/NAME-gguf` against `fixtures/NAME`.
fn check(name: &str) {
    let hf_dir = fixtures().join(name);
    let model = GgufModel::open(&gguf_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (hf_spec, _) = load_parts(&hf_dir, |_| {}).unwrap();
    assert_eq!(model.spec, hf_spec, "{name}: GGUF spec vs config.json");
    assert_eq!(model.chat_template, None);

    let (spec, weights) = model.weights_for(|_| {}, &Plan::single()).unwrap();
    let reference = Reference::from_file(&hf_dir.join("reference.json"), spec.vocab).unwrap();
    let mut engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
    let r = verify(&mut engine, &reference).unwrap();
    eprintln!("{name}: {r:?}");
    assert!(r.greedy_total >= 2 && r.passed(), "{name}: {r:?}");

    let hf = TextCodec::from_file(&hf_dir.join("tokenizer.json")).unwrap();
    let text = "Hello, world! It's 2024 \u{2014} \u{fc}n\u{ef}c\u{f6}d\u{e9}\n\tdone  ";
    let ids = hf.encode(text).unwrap();
    assert_eq!(model.tokenizer.encode(text).unwrap(), ids, "{name}");
    assert_eq!(model.tokenizer.decode(&ids).unwrap(), text, "{name}");
}

#[test]
fn llama_tiny() {
    check("llama-tiny");
}

#[test]
fn mixtral_tiny() {
    check("mixtral-tiny");
}

#[test]
fn mixtral_tiny_f16() {
    check("mixtral-tiny-f16");
}

/// BF16 weights in three shards.
#[test]
fn mixtral_tiny_bf16_split() {
    check("mixtral-tiny-bf16");
}

#[test]
fn qwen2_moe_tiny() {
    check("qwen2-moe-tiny");
}

#[test]
fn qwen3_moe_tiny() {
    check("qwen3-moe-tiny");
}

/// The llama converter's q/k row order is undone: served q and k equal the safetensors ones.
#[test]
fn llama_q_and_k_come_back_in_hugging_face_order() {
    let model = GgufModel::open(&gguf_path("mixtral-tiny")).unwrap();
    let hf =
        shardline_model::safetensors_dir::SafetensorsDir::open(&fixtures().join("mixtral-tiny"))
            .unwrap();
    let (s, h) = (&model.spec, model.spec.hidden);
    for (name, shape) in [
        ("model.layers.1.self_attn.q_proj.weight", [s.q_width(), h]),
        ("model.layers.1.self_attn.k_proj.weight", [s.kv_width(), h]),
        ("model.layers.1.self_attn.v_proj.weight", [s.kv_width(), h]),
        (
            "model.layers.0.block_sparse_moe.experts.3.w2.weight",
            [h, 64],
        ),
    ] {
        let a = model.tensors.get(name, &shape).unwrap().to_f32_vec();
        let b = hf.get(name, &shape).unwrap().to_f32_vec();
        assert_eq!(a, b, "{name}");
    }
}

/// Any shard opens the whole set; a missing shard or a shard renamed out of the set is named.
#[test]
fn split_sets() {
    let first = gguf_path("mixtral-tiny-bf16");
    let second = first.with_file_name("model-00002-of-00003.gguf");
    let spec = GgufModel::open(&first).unwrap().spec;
    assert_eq!(GgufModel::open(&second).unwrap().spec, spec);
    assert_eq!(GgufFiles::open(&second).unwrap().files().len(), 3);

    let tmp = tempfile::tempdir().unwrap();
    for k in 1..=2 {
        let name = format!("model-0000{k}-of-00003.gguf");
        std::fs::copy(first.with_file_name(&name), tmp.path().join(&name)).unwrap();
    }
    let e = GgufModel::open(&tmp.path().join("model-00001-of-00003.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model-00003-of-00003.gguf"), "{e}");

    let lone = tmp.path().join("model.gguf");
    std::fs::copy(&first, &lone).unwrap();
    let e = GgufModel::open(&lone).err().unwrap();
    assert!(
        matches!(&e, ModelError::Gguf(g) if matches!(g.kind, GgufErrorKind::Split { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("split.count"), "{e}");
}

/// Loading under a tensor-parallel plan slices the GGUF weights too (rank 1 of 2).
#[test]
fn loads_a_rank_of_a_plan() {
    let model = GgufModel::open(&gguf_path("qwen2-moe-tiny")).unwrap();
    let plan = Plan::new(2, 1, 1).unwrap();
    let (_, w) = model.weights_for(|_| {}, &plan).unwrap();
    assert_eq!(w.layers[0].attn.n_heads, model.spec.n_heads / 2);
}

/// A GGUF written byte by byte, for hostile-input tests.
struct Builder {
    version: u32,
    n_kv: u64,
    kv: Vec<u8>,
    n_tensors: u64,
    info: Vec<u8>,
    data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Builder {
        Builder {
            version: 3,
            n_kv: 0,
            kv: Vec::new(),
            n_tensors: 0,
            info: Vec::new(),
            data: Vec::new(),
        }
    }

    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Builder {
        string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn u32(&mut self, key: &str, v: u32) -> &mut Builder {
        self.kv(key, 4, &v.to_le_bytes())
    }

    fn f32(&mut self, key: &str, v: f32) -> &mut Builder {
        self.kv(key, 6, &v.to_le_bytes())
    }

    fn str(&mut self, key: &str, v: &str) -> &mut Builder {
        let mut b = Vec::new();
        string(&mut b, v);
        self.kv(key, 8, &b)
    }

    fn strs(&mut self, key: &str, v: &[&str]) -> &mut Builder {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            string(&mut b, s);
        }
        self.kv(key, 9, &b)
    }

    /// A tensor of ggml type `ty`, dimensions `ne` innermost first.
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, bytes: &[u8]) -> &mut Builder {
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        string(&mut self.info, name);
        self.info.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.info.extend(d.to_le_bytes());
        }
        self.info.extend(ty.to_le_bytes());
        self.info.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.n_tensors += 1;
        self
    }

    fn f32_tensor(&mut self, name: &str, ne: &[u64]) -> &mut Builder {
        let n: u64 = ne.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect();
        self.tensor(name, ne, 0, &bytes)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.info);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }
}

/// A one-layer dense llama, hidden 8, 2 heads of 4, vocabulary of 4 tokens.
fn tiny_llama() -> Builder {
    tiny("llama")
}

/// A one-layer dense model of architecture `arch` (`llama`, `qwen2`: q/k/v biases, `qwen3`: q/k
/// norms), hidden 8, 2 heads of 4, vocabulary of 4 tokens.
fn tiny(arch: &str) -> Builder {
    let k = |key: &str| format!("{arch}.{key}");
    let mut b = Builder::new();
    b.str("general.architecture", arch)
        .u32(&k("block_count"), 1)
        .u32(&k("context_length"), 16)
        .u32(&k("embedding_length"), 8)
        .u32(&k("feed_forward_length"), 16)
        .u32(&k("attention.head_count"), 2)
        .f32(&k("attention.layer_norm_rms_epsilon"), 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt-2")
        .strs("tokenizer.ggml.tokens", &["a", "b", "ab", "<|end|>"])
        .strs("tokenizer.ggml.merges", &["a b"])
        .kv(
            "tokenizer.ggml.token_type",
            9,
            &[
                5u32.to_le_bytes().as_slice(),
                &4u64.to_le_bytes(),
                &1i32.to_le_bytes(),
                &1i32.to_le_bytes(),
                &1i32.to_le_bytes(),
                &3i32.to_le_bytes(),
            ]
            .concat(),
        )
        .u32("tokenizer.ggml.eos_token_id", 3)
        .str("tokenizer.chat_template", "{{ messages }}")
        .f32_tensor("token_embd.weight", &[8, 4])
        .f32_tensor("output_norm.weight", &[8])
        .f32_tensor("blk.0.attn_norm.weight", &[8])
        .f32_tensor("blk.0.ffn_norm.weight", &[8])
        .f32_tensor("blk.0.attn_q.weight", &[8, 8])
        .f32_tensor("blk.0.attn_k.weight", &[8, 8])
        .f32_tensor("blk.0.attn_v.weight", &[8, 8])
        .f32_tensor("blk.0.attn_output.weight", &[8, 8])
        .f32_tensor("blk.0.ffn_gate.weight", &[8, 16])
        .f32_tensor("blk.0.ffn_up.weight", &[8, 16])
        .f32_tensor("blk.0.ffn_down.weight", &[16, 8]);
    match arch {
        "qwen2" => {
            for t in ["q", "k", "v"] {
                b.f32_tensor(&format!("blk.0.attn_{t}.bias"), &[8]);
            }
        }
        "qwen3" => {
            for t in ["q", "k"] {
                b.f32_tensor(&format!("blk.0.attn_{t}_norm.weight"), &[4]);
            }
        }
        _ => {}
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The kind of a GGUF error, asserting the message names the file.
fn gguf_kind(e: ModelError, path: &Path) -> GgufErrorKind {
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    match e {
        ModelError::Gguf(g) => g.kind,
        other => panic!("not a GGUF error: {other}"),
    }
}

#[test]
fn tiny_model_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "tiny.gguf", &tiny_llama().bytes());
    let model = GgufModel::open(&p).unwrap();
    assert_eq!(model.spec.eos_ids, [3]);
    assert!(model.spec.tie_embeddings && model.spec.moe.is_none());
    assert_eq!(model.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(
        (model.bos_token.as_deref(), model.eos_token.as_deref()),
        (None, Some("<|end|>"))
    );
    // The merge joins `a b`; the control token is matched whole and skipped in decoding.
    assert_eq!(model.tokenizer.encode("ab<|end|>b").unwrap(), [2, 3, 1]);
    assert_eq!(model.tokenizer.decode(&[2, 3, 1]).unwrap(), "abb");
    let (spec, weights) = model.weights_for(|_| {}, &Plan::single()).unwrap();
    let mut engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
    engine.start(2).unwrap();
    let logits = engine
        .forward(&[0, 2], shardline_model::Logits::Last)
        .unwrap();
    assert!(logits.len() == 4 && logits.iter().all(|x| x.is_finite()));
}

#[test]
fn a_small_file_claiming_2_to_the_40_tensors_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = Builder::new();
    b.n_tensors = 1 << 40;
    let mut bytes = b.bytes();
    bytes.resize(1024, 0);
    let p = write(tmp.path(), "huge.gguf", &bytes);
    let e = GgufFile::open(&p).unwrap_err();
    assert!(e.to_string().contains("the tensor count"), "{e}");
    match gguf_kind(e, &p) {
        GgufErrorKind::TooMany { count, left, .. } => {
            assert_eq!((count, left), (1 << 40, 1000));
        }
        k => panic!("{k}"),
    }
}

#[test]
fn hostile_headers_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: &[u8]| {
        let p = write(tmp.path(), name, bytes);
        let e = GgufModel::open(&p).err().expect("must fail");
        (e.to_string(), gguf_kind(e, &p))
    };
    let (_, k) = open("magic.gguf", b"GGML\x03\0\0\0");
    assert!(matches!(k, GgufErrorKind::Magic { .. }), "{k}");
    let (_, k) = open("empty.gguf", b"");
    assert!(matches!(k, GgufErrorKind::Magic { .. }), "{k}");
    let mut b = tiny_llama();
    b.version = 1;
    let (_, k) = open("v1.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::Version { version: 1 }), "{k}");
    b.version = 3u32.swap_bytes();
    let (msg, _) = open("be.gguf", &b.bytes());
    assert!(msg.contains("big-endian"), "{msg}");

    // A string length past the end, an array length past the end, an unknown value type.
    let mut b = Builder::new();
    b.kv("general.name", 8, &u64::MAX.to_le_bytes());
    let (msg, k) = open("string.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::Truncated { .. }), "{k}");
    assert!(msg.contains("general.name"), "{msg}");
    let mut b = Builder::new();
    b.kv(
        "tokenizer.ggml.tokens",
        9,
        &[8u32.to_le_bytes().as_slice(), &(1u64 << 50).to_le_bytes()].concat(),
    );
    let (msg, k) = open("array.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::TooMany { .. }), "{k}");
    assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");
    let mut b = Builder::new();
    b.kv("x", 13, &[0; 8]);
    let (_, k) = open("type.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::ValueType { ty: 13, .. }), "{k}");
    // Arrays of arrays of ... deeper than the parser follows.
    let mut nested = Vec::new();
    for _ in 0..64 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(4u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    let mut b = Builder::new();
    b.kv("deep", 9, &nested);
    let (_, k) = open("deep.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::Nesting { .. }), "{k}");
    let mut b = tiny_llama();
    b.u32("llama.block_count", 2);
    let (_, k) = open("dup.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::DuplicateKey { .. }), "{k}");

    // Tensor infos: too many dimensions, an unknown type, bytes past the end, a bad offset.
    let mut b = tiny_llama();
    b.tensor("t", &[1, 1, 1, 1, 1], 0, &[0; 4]);
    let (_, k) = open("dims.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::Dims { n_dims: 5, .. }), "{k}");
    let mut b = tiny_llama();
    b.tensor("t", &[4], 31, &[0; 4]);
    let (_, k) = open("ggml.gguf", &b.bytes());
    assert!(
        matches!(k, GgufErrorKind::UnknownType { ty: 31, .. }),
        "{k}"
    );
    let mut b = tiny_llama();
    b.tensor("t", &[1 << 20], 0, &[0; 4]);
    let (msg, k) = open("bounds.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::OutOfBounds { .. }), "{k}");
    assert!(msg.contains("tensor `t`"), "{msg}");
    let mut b = tiny_llama();
    b.tensor("t", &[u64::MAX, 4], 0, &[]);
    let (_, k) = open("overflow.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::DimSize { .. }), "{k}");
    let mut b = tiny_llama();
    b.tensor("blk.0.attn_norm.weight", &[8], 0, &[0; 32]);
    let (_, k) = open("duptensor.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::DuplicateTensor { .. }), "{k}");
    let mut b = tiny_llama();
    b.u32("general.alignment", 48);
    let (_, k) = open("align.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::Alignment { .. }), "{k}");

    // Metadata: an unknown architecture, a missing key, a key of the wrong type.
    let mut b = Builder::new();
    b.str("general.architecture", "mamba");
    let (msg, k) = open("arch.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::UnknownArch { .. }), "{k}");
    assert!(msg.contains("`mamba`"), "{msg}");
    let mut b = Builder::new();
    b.str("general.architecture", "qwen3moe");
    let (msg, k) = open("missing.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::MissingKey { .. }), "{k}");
    assert!(msg.contains("qwen3moe.embedding_length"), "{msg}");
    let mut b = Builder::new();
    b.str("general.architecture", "llama")
        .str("llama.embedding_length", "8");
    let (_, k) = open("keytype.gguf", &b.bytes());
    assert!(matches!(k, GgufErrorKind::KeyType { .. }), "{k}");
}

#[test]
fn quantized_and_missing_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // A Q8_0 output matrix (2 rows of one 32-element block, 34 bytes each) is read as Q8_0.
    let mut b = tiny_llama();
    b.tensor("output.weight", &[32, 2], 8, &[0; 68]);
    let p = write(tmp.path(), "q8.gguf", &b.bytes());
    let model = GgufModel::open(&p).unwrap();
    let w = model.tensors.get("lm_head.weight", &[2, 32]).unwrap();
    assert_eq!(w.dtype().name(), "q8_0");
    // A Q4_1 one (20 bytes a block) is a type Shardline does not read: named.
    let mut b = tiny_llama();
    b.tensor("output.weight", &[32, 2], 3, &[0; 40]);
    let p = write(tmp.path(), "q4_1.gguf", &b.bytes());
    let model = GgufModel::open(&p).unwrap();
    let e = model.tensors.get("lm_head.weight", &[2, 32]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("output.weight") && msg.contains("Q4_1"),
        "{msg}"
    );
    assert!(matches!(
        gguf_kind(e, &p),
        GgufErrorKind::UnsupportedType { .. }
    ));
    let e = model
        .tensors
        .get("model.layers.0.self_attn.q_norm.weight", &[4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.attn_q_norm.weight"), "{e}");
}

/// Parses `bytes` as far as it goes, through spec, tokenizer and weights; only errors may come.
fn exercise(bytes: &[u8]) {
    let mut map = MmapMut::map_anon(bytes.len().max(1)).unwrap();
    map[..bytes.len()].copy_from_slice(bytes);
    let map: Mmap = map.make_read_only().unwrap();
    let Ok(file) = GgufFile::from_map(Path::new("fuzz.gguf"), Arc::new(map)) else {
        return;
    };
    let Ok(files) = GgufFiles::from_files(vec![file]) else {
        return;
    };
    let _ = tokenizer::text_codec(&files).map(|t| t.encode("Hello, world"));
    let _ = tokenizer::chat_template(&files);
    let Ok(spec) = model_spec(&files) else {
        return;
    };
    if let Ok(tensors) = GgufTensors::new(files, &spec) {
        let _ = load_model(&spec, &tensors);
    }
}

/// Where the tensor data of a valid GGUF starts (everything before is structure; all of a file
/// without tensors).
fn header_len(bytes: &[u8]) -> usize {
    let mut map = MmapMut::map_anon(bytes.len()).unwrap();
    map.copy_from_slice(bytes);
    let file =
        GgufFile::from_map(Path::new("seed"), Arc::new(map.make_read_only().unwrap())).unwrap();
    file.tensors()
        .iter()
        .map(|t| file.range(t).start)
        .min()
        .unwrap_or(bytes.len())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random byte changes to the structure of valid GGUFs, and truncations, never panic. The
    /// bytes written lean to small numbers and ASCII, so that many changed files still parse
    /// and go on to the spec, the tokenizer and the weights.
    #[test]
    fn mutations_never_panic(
        seed in 0usize..4,
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![any::<u8>(), 0u8..4, b'a'..=b'z']),
            1..4,
        ),
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mut bytes = match seed {
            0 => tiny_llama().bytes(),
            1 => std::fs::read(gguf_path("qwen2-moe-tiny")).unwrap(),
            2 => std::fs::read(tokenizer_fixture("spm.gguf")).unwrap(),
            _ => std::fs::read(tokenizer_fixture("bpe.gguf")).unwrap(),
        };
        let header = header_len(&bytes);
        for (at, byte) in edits {
            let i = at.index(header);
            bytes[i] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&bytes);
    }
}

fn tokenizer_fixture(name: &str) -> PathBuf {
    fixtures().join("tokenizers-gguf").join(name)
}

/// A SentencePiece BPE vocabulary (scores, byte fallback, a user-defined token) encodes as
/// sentencepiece itself does, plus llama.cpp's BOS, and decodes back.
#[test]
fn sentencepiece_vocabulary_encodes_as_sentencepiece() {
    let files = GgufFiles::open(&tokenizer_fixture("spm.gguf")).unwrap();
    let codec = tokenizer::text_codec(&files).unwrap();
    let expected: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_fixture("spm-expected.json")).unwrap(),
    )
    .unwrap();
    assert!(expected.len() >= 5);
    // As llama.cpp (and transformers' Llama tokenizer): a leading user-defined token is matched
    // whole, and the text after it gets the space prefix.
    let ids = codec.encode("<|im_start|>user").unwrap();
    assert_eq!(ids[..2], [1, 3]);
    assert_eq!(ids[2..], codec.encode("user").unwrap()[1..]);
    for e in expected {
        let text = e["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(e["ids"].clone()).unwrap();
        assert_eq!(codec.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(codec.decode(&ids).unwrap(), text);
    }
}

/// A byte-level BPE vocabulary with Llama 3's pre-tokenizer, merges and control tokens encodes as
/// the `tokenizer.json` it was converted from; the chat template comes along.
#[test]
fn byte_level_bpe_vocabulary_encodes_as_its_tokenizer_json() {
    let files = GgufFiles::open(&tokenizer_fixture("bpe.gguf")).unwrap();
    let codec = tokenizer::text_codec(&files).unwrap();
    let hf = TextCodec::from_file(&tokenizer_fixture("bpe-tokenizer.json")).unwrap();
    for text in [
        "Hello world",
        "The router picks the top two experts.",
        " leading space and  two  spaces",
        "new\nline\ttab\r\n",
        "digits 12345 and 3.14159, it's THEY'RE",
        "\u{fc}n\u{ef}c\u{f6}d\u{e9} \u{4f60}\u{597d} \u{1f999} unseen: \u{416}\u{436}",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ] {
        let ids = hf.encode(text).unwrap();
        assert_eq!(codec.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(
            codec.encode_rendered(text).unwrap(),
            hf.encode_rendered(text).unwrap()
        );
        assert_eq!(codec.decode(&ids).unwrap(), hf.decode(&ids).unwrap());
    }
    let template = tokenizer::chat_template(&files).unwrap().unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
}

/// Dense Qwen2 and Qwen3 run as Llama's decoder with their biases or q/k norms; their q and k are
/// stored in Hugging Face order (no permutation), llama's are permuted. Linear rope scaling is
/// read; per-frequency rope factors are refused.
#[test]
fn dense_qwen_and_rope_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let stored: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
    for arch in ["qwen2", "qwen3", "llama"] {
        let p = write(tmp.path(), &format!("{arch}.gguf"), &tiny(arch).bytes());
        let model = GgufModel::open(&p).unwrap();
        let s = &model.spec;
        assert_eq!(s.arch, shardline_model::Arch::Llama, "{arch}");
        assert_eq!((s.qkv_bias, s.qk_norm), (arch == "qwen2", arch == "qwen3"));
        let served = model.tensors.get(q, &[8, 8]).unwrap().to_f32_vec();
        assert_eq!(served == stored, arch != "llama", "{arch}");
        let (spec, weights) = model.weights_for(|_| {}, &Plan::single()).unwrap();
        let mut engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
        engine.start(2).unwrap();
        let logits = engine
            .forward(&[1, 2], shardline_model::Logits::Last)
            .unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{arch}");
    }

    let mut b = tiny_llama();
    b.str("llama.rope.scaling.type", "linear")
        .f32("llama.rope.scaling.factor", 4.0);
    let p = write(tmp.path(), "linear.gguf", &b.bytes());
    let spec = GgufModel::open(&p).unwrap().spec;
    assert_eq!(
        spec.rope_scaling,
        shardline_model::rope::RopeScaling::Linear { factor: 4.0 }
    );
    let mut b = tiny_llama();
    b.str("llama.rope.scaling.type", "yarn");
    let p = write(tmp.path(), "yarn.gguf", &b.bytes());
    let e = GgufModel::open(&p).err().unwrap().to_string();
    assert!(e.contains("yarn") && e.contains("yarn.gguf"), "{e}");
    let mut b = tiny_llama();
    b.f32_tensor("rope_freqs.weight", &[2]);
    let p = write(tmp.path(), "freqs.gguf", &b.bytes());
    let e = GgufModel::open(&p).err().unwrap().to_string();
    assert!(e.contains("rope_freqs.weight"), "{e}");
    // More blocks in the file than the block count says.
    let mut b = tiny_llama();
    b.f32_tensor("blk.1.attn_norm.weight", &[8]);
    let p = write(tmp.path(), "blocks.gguf", &b.bytes());
    let e = GgufModel::open(&p)
        .unwrap()
        .weights_for(|_| {}, &Plan::single())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("blk.1.attn_norm.weight"), "{e}");
}
