//! `shardline bench kernels`: the CPU kernels at real model shapes, and the machine's memory read
//! bandwidth in the same run, one JSON record per case (keys in README.md, "Benchmarks").

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Map, Value};
use shardline_model::progress::Step;
use shardline_tensor::kernels::{self, KvCache, Rope};
use shardline_tensor::quant::QuantFormat;
use shardline_tensor::reference::values;
use shardline_tensor::{pool, DType, Isa, Shape, Tensor};

use super::record::{Sink, Stats};

/// The cases, for `--help` (the PyTorch peer `bench/peers/torch_kernels.py` runs the same ones).
const CASES: &str = "\
Cases (JSON keys: bench=kernels, kernel, dtype, rows, cols, gbps, median_us, p99_us, iters,
plus isa and threads; extra keys per case are named below):
  mem_read    f32  rows=1 cols=268435456 (1 GiB, summed by all threads)
  matvec      f32|f16|bf16  W [rows, cols] = 14336x4096, 4096x14336, 4096x4096, 1024x3584,
              3584x1024; x and y in f32
  matvec      q8_0|q4_0|q4_k|q5_k|q6_k  the same shapes (ggml blocks of random quants; x
              quantized to Q8_0 or Q8_K inside each call, as the engine does)
  matmul      f32|f16|bf16  rows=4096 cols=4096, m=2, 4, 8, 16 (batched decode) and m=128
              (prefill); x is [m, cols]
  rms_norm    f32  rows=1 cols=4096
  rope        f32  rows=1 cols=4096 (32 heads x 128, theta 1e6, position 1000)
  attention   f32  rows=4096 (context) cols=4096 (32 heads x 128), kv_heads=8, tokens=1
  attention   f32  rows=512 cols=4096, kv_heads=8, tokens=512 (causal prefill)
  silu_mul    f32  rows=1 cols=14336
  softmax     f32  rows=1 cols=4096
  top_k       f32  rows=1 cols=8 k=2, and cols=128 k=8
  add_assign | axpy | scale  f32  rows=1 cols=4096
  embedding   bf16 rows=32000 cols=4096 (one token)
gbps counts the bytes a case must read and write (for matvec and matmul: the weights only,
for quantized weights their block bytes).
Every weight matrix is cycled over enough copies to span at least 256 MiB (8x a 32 MiB
last-level cache), so each matvec reads its weights from memory, not from the cache.
SHARDLINE_ISA=avx2 (or scalar) measures a narrower SIMD path.";

/// Measure the CPU kernels at model shapes.
#[derive(clap::Args)]
#[command(after_help = CASES)]
pub struct KernelsArgs {
    /// Also write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timed iterations per case (after a warm-up).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Worker threads (default: SHARDLINE_THREADS, else all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Run only these kernels (comma-separated names from the list below).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// Bytes every case's weights span at least, cycling over copies: 8x a 32 MiB last-level cache.
const COLD_BYTES: usize = 256 << 20;
/// The buffer `mem_read` sums.
const MEM_READ_BYTES: usize = 1 << 30;
const MATVEC_SHAPES: [(usize, usize); 5] = [
    (14336, 4096),
    (4096, 14336),
    (4096, 4096),
    (1024, 3584),
    (3584, 1024),
];
/// The quantized weight formats `matvec` measures, in ggml's type order.
const QUANT_DTYPES: [DType; 5] = [
    DType::Quant(QuantFormat::Q4_0),
    DType::Quant(QuantFormat::Q8_0),
    DType::Quant(QuantFormat::Q4K),
    DType::Quant(QuantFormat::Q5K),
    DType::Quant(QuantFormat::Q6K),
];
const MATMUL_SHAPE: (usize, usize) = (4096, 4096);
/// Batched decode (a few rows per weight: 2..16 sequences, or a MoE expert's share of them)
/// and prefill.
const MATMUL_MS: [usize; 5] = [2, 4, 8, 16, 128];
/// Every kernel name a case can have (for `--only`).
const KERNELS: [&str; 13] = [
    "mem_read",
    "matvec",
    "matmul",
    "rms_norm",
    "rope",
    "attention",
    "silu_mul",
    "softmax",
    "top_k",
    "add_assign",
    "axpy",
    "scale",
    "embedding",
];
const HIDDEN: usize = 4096;
const FFN: usize = 14336;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;

pub fn run(args: KernelsArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threads {
        pool::init(t as usize).context("--threads")?;
    }
    let mut b = Bench {
        sink: Sink::new(args.json.as_deref())?,
        only: args.only,
        iters: args.iters as usize,
        common: Map::new(),
    };
    if let Some(bad) = b.only.iter().find(|k| !KERNELS.contains(&k.as_str())) {
        anyhow::bail!(
            "--only: unknown kernel `{bad}` (known: {})",
            KERNELS.join(", ")
        );
    }
    b.common.insert("isa".into(), Isa::active().name().into());
    b.common
        .insert("threads".into(), pool::num_threads().into());

    // A bar on a terminal (the whole run takes minutes): one unit per group of cases.
    let matvecs = MATVEC_SHAPES.len() * (DType::ALL.len() + QUANT_DTYPES.len());
    let groups = 1 + matvecs + MATMUL_MS.len() * DType::ALL.len() + 3;
    let progress = Step::begin("bench kernels", groups as u64);
    mem_read(&mut b)?;
    progress.advance();
    for (rows, cols) in MATVEC_SHAPES {
        for dtype in DType::ALL.into_iter().chain(QUANT_DTYPES) {
            matvec(&mut b, dtype, rows, cols)?;
            progress.advance();
        }
    }
    for m in MATMUL_MS {
        for dtype in DType::ALL {
            matmul(&mut b, dtype, m)?;
            progress.advance();
        }
    }
    small_kernels(&mut b)?;
    progress.advance();
    attention(&mut b, 4096, 1)?;
    progress.advance();
    attention(&mut b, 512, 512)?;
    Ok(())
}

struct Bench {
    sink: Sink,
    only: Vec<String>,
    iters: usize,
    common: Map<String, Value>,
}

/// One measured case: what it is and how many bytes one iteration moves.
struct Case {
    kernel: &'static str,
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: usize,
    extra: Value,
}

impl Bench {
    /// Whether `--only` selects `kernel`.
    fn wants(&self, kernel: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == kernel)
    }

    /// Times `f(i)` for iteration `i`: `warmup` untimed calls, then `self.iters` timed ones.
    fn measure(
        &mut self,
        case: Case,
        warmup: usize,
        mut f: impl FnMut(usize),
    ) -> anyhow::Result<()> {
        if !self.wants(case.kernel) {
            return Ok(());
        }
        for i in 0..warmup.max(3) {
            f(i);
        }
        let mut samples: Vec<f64> = (0..self.iters)
            .map(|i| {
                let t = Instant::now();
                f(i);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        let stats = Stats::from_samples(&mut samples);
        let mut fields = Map::new();
        fields.insert("kernel".into(), case.kernel.into());
        fields.insert("dtype".into(), case.dtype.name().into());
        fields.insert("rows".into(), case.rows.into());
        fields.insert("cols".into(), case.cols.into());
        let gbps = case.bytes as f64 / (stats.median_us * 1e3);
        fields.insert("gbps".into(), ((gbps * 100.0).round() / 100.0).into());
        if let Value::Object(extra) = case.extra {
            fields.extend(extra);
        }
        fields.extend(self.common.clone());
        self.sink.write("kernels", stats, fields)
    }
}

/// Enough copies of one tensor to span [`COLD_BYTES`] (so cycling over them defeats the cache):
/// float values from `values`, or ggml blocks of random bytes with scales of about 2^-8 (the
/// speed of a quantized kernel does not depend on the values; quantizing this many real values
/// to the K-quants would take longer than the measurement).
fn weights(dtype: DType, shape: &Shape, seed: u64) -> anyhow::Result<Vec<Tensor>> {
    let first = match dtype {
        DType::Quant(q) => {
            Tensor::from_bytes(dtype, shape.clone(), &random_blocks(q, shape, seed)?)?
        }
        _ => Tensor::from_f32(dtype, shape.clone(), &values(shape.elem_count(), seed))?,
    };
    let copies = COLD_BYTES.div_ceil(first.bytes().len().max(1));
    Ok(std::iter::repeat_n(first, copies).collect())
}

/// `shape`'s elements as `format` blocks of random bytes, each f16 scale set to a finite value
/// between 2^-9 and 2^-7.
fn random_blocks(format: QuantFormat, shape: &Shape, seed: u64) -> anyhow::Result<Vec<u8>> {
    let cols = shape.dims().last().copied().unwrap_or(1);
    let bytes = format.row_bytes(cols)? * (shape.elem_count() / cols.max(1));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.u8(..)).collect();
    let scales: &[usize] = match format {
        QuantFormat::Q4_0 | QuantFormat::Q8_0 => &[0],
        QuantFormat::Q4K | QuantFormat::Q5K => &[0, 2],
        QuantFormat::Q6K => &[208],
    };
    for block in out.chunks_exact_mut(format.block_bytes()) {
        for &at in scales {
            let scale = half::f16::from_f32(rng.f32() * 2f32.powi(-7) + 2f32.powi(-9));
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
    }
    Ok(out)
}

fn mem_read(b: &mut Bench) -> anyhow::Result<()> {
    if !b.wants("mem_read") {
        return Ok(());
    }
    // Non-zero, so every page is really allocated (zero pages could all map to one frame).
    let buf = vec![1.0f32; MEM_READ_BYTES / 4];
    let case = Case {
        kernel: "mem_read",
        dtype: DType::F32,
        rows: 1,
        cols: buf.len(),
        bytes: MEM_READ_BYTES,
        extra: json!({}),
    };
    b.measure(case, 3, |_| {
        black_box(kernels::sum(black_box(&buf)));
    })
}

fn matvec(b: &mut Bench, dtype: DType, rows: usize, cols: usize) -> anyhow::Result<()> {
    if !b.wants("matvec") {
        return Ok(());
    }
    let ws = weights(dtype, &Shape::new([rows, cols]), 1)?;
    let x = values(cols, 2);
    let mut y = vec![0.0f32; rows];
    let case = Case {
        kernel: "matvec",
        dtype,
        rows,
        cols,
        bytes: ws[0].bytes().len(),
        extra: json!({}),
    };
    b.measure(case, ws.len(), |i| {
        kernels::matvec(&ws[i % ws.len()].view(), black_box(&x), &mut y);
        black_box(&y);
    })
}

fn matmul(b: &mut Bench, dtype: DType, m: usize) -> anyhow::Result<()> {
    if !b.wants("matmul") {
        return Ok(());
    }
    let (rows, cols) = MATMUL_SHAPE;
    let ws = weights(dtype, &Shape::new([rows, cols]), 3)?;
    let x = values(m * cols, 4);
    let mut y = vec![0.0f32; m * rows];
    let case = Case {
        kernel: "matmul",
        dtype,
        rows,
        cols,
        bytes: ws[0].bytes().len(),
        extra: json!({ "m": m }),
    };
    b.measure(case, 3, |i| {
        kernels::matmul(&ws[i % ws.len()].view(), black_box(&x), m, &mut y);
        black_box(&y);
    })
}

/// The vector kernels of one decode step, at Mixtral-8x7B's sizes.
fn small_kernels(b: &mut Bench) -> anyhow::Result<()> {
    let f32_case = |kernel, cols, bytes, extra| Case {
        kernel,
        dtype: DType::F32,
        rows: 1,
        cols,
        bytes,
        extra,
    };
    let x = values(FFN, 5);
    let g = values(FFN, 6);
    let mut out = vec![0.0f32; FFN];

    let (xh, wh) = (&x[..HIDDEN], &g[..HIDDEN]);
    b.measure(
        f32_case("rms_norm", HIDDEN, 3 * 4 * HIDDEN, json!({})),
        10,
        |_| kernels::rms_norm(black_box(xh), wh, 1e-5, &mut out[..HIDDEN]),
    )?;

    let rope = Rope::new(HEAD_DIM, 4096, 1e6);
    let mut q = x[..HEADS * HEAD_DIM].to_vec();
    b.measure(
        f32_case(
            "rope",
            HEADS * HEAD_DIM,
            2 * 4 * HEADS * HEAD_DIM,
            json!({}),
        ),
        10,
        |_| rope.apply(black_box(&mut q), HEADS, 1000),
    )?;

    b.measure(
        f32_case("silu_mul", FFN, 3 * 4 * FFN, json!({})),
        10,
        |_| kernels::silu_mul(black_box(&x), &g, &mut out),
    )?;

    let mut s = x[..4096].to_vec();
    b.measure(
        f32_case("softmax", 4096, 2 * 4 * 4096, json!({})),
        10,
        |_| {
            s.copy_from_slice(&x[..4096]);
            kernels::softmax(black_box(&mut s))
        },
    )?;

    for (n, k) in [(8, 2), (128, 8)] {
        let (mut idx, mut val) = (vec![0usize; k], vec![0.0f32; k]);
        b.measure(f32_case("top_k", n, 4 * n, json!({ "k": k })), 10, |_| {
            kernels::top_k(black_box(&x[..n]), &mut idx, &mut val)
        })?;
    }

    let mut a = x[..HIDDEN].to_vec();
    b.measure(
        f32_case("add_assign", HIDDEN, 3 * 4 * HIDDEN, json!({})),
        10,
        |_| kernels::add_assign(black_box(&mut a), wh),
    )?;
    b.measure(
        f32_case("axpy", HIDDEN, 3 * 4 * HIDDEN, json!({})),
        10,
        |_| kernels::axpy(0.5, wh, black_box(&mut a)),
    )?;
    b.measure(
        f32_case("scale", HIDDEN, 2 * 4 * HIDDEN, json!({})),
        10,
        |_| kernels::scale(black_box(&mut a), 0.999),
    )?;

    let vocab = 32000;
    if !b.wants("embedding") {
        return Ok(());
    }
    let table = Tensor::from_f32(DType::BF16, [vocab, HIDDEN], &values(vocab * HIDDEN, 7))?;
    let case = Case {
        kernel: "embedding",
        dtype: DType::BF16,
        rows: vocab,
        cols: HIDDEN,
        bytes: 6 * HIDDEN,
        extra: json!({}),
    };
    b.measure(case, 10, |i| {
        kernels::embedding(&table.view(), (i * 7919) % vocab, &mut out[..HIDDEN])
    })
}

/// Attention of `tokens` new tokens over a cache of `context` positions (GQA, 32/8 heads).
fn attention(b: &mut Bench, context: usize, tokens: usize) -> anyhow::Result<()> {
    if !b.wants("attention") {
        return Ok(());
    }
    let kv_row = KV_HEADS * HEAD_DIM;
    let mut cache = KvCache::new(KV_HEADS, HEAD_DIM, context);
    cache.append(&values(context * kv_row, 8), &values(context * kv_row, 9));
    let q = values(tokens * HEADS * HEAD_DIM, 10);
    let mut out = vec![0.0f32; q.len()];
    let case = Case {
        kernel: "attention",
        dtype: DType::F32,
        rows: context,
        cols: HEADS * HEAD_DIM,
        // The cache's keys and values, read once per query row at least.
        bytes: 2 * 4 * context * kv_row,
        extra: json!({ "kv_heads": KV_HEADS, "tokens": tokens }),
    };
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    b.measure(case, 3, |_| {
        kernels::attention(black_box(&q), &cache, HEADS, scale, &mut out);
        black_box(&out);
    })
}
