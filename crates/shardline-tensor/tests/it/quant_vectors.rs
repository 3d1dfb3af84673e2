//! The quantized block formats against vectors made by gguf-py (scripts/make_quant_vectors.py,
//! stored in tests/data/quant): dequantization and Q8_0 quantization must match bit for bit, and
//! Q8_K quantization must match the script's transcription of ggml's quantize_row_q8_K_ref.

use std::path::PathBuf;

use shardline_tensor::quant::{dequantize_row, quantize_row_q8_0, quantize_row_q8_k, QuantFormat};

/// A little-endian reader over one vector file.
struct Reader {
    bytes: Vec<u8>,
    at: usize,
}

impl Reader {
    fn open(name: &str, magic: &[u8; 4]) -> Reader {
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/data/quant", name]
            .iter()
            .collect();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut r = Reader { bytes, at: 0 };
        assert_eq!(r.take(4), magic, "{name}: magic");
        r
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        s
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn finish(&self, name: &str) {
        assert_eq!(self.at, self.bytes.len(), "{name}: trailing bytes");
    }
}

/// Asserts `got` and `want` are the same bits (so NaNs and signed zeros count), naming the first
/// element that is not.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i} is {g:e}, gguf-py gives {w:e}"
        );
    }
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    for format in QuantFormat::ALL {
        let name = format!("dequant_{}.bin", format.name().to_lowercase());
        let mut r = Reader::open(&name, b"SLQD");
        assert_eq!(
            QuantFormat::from_ggml_type_id(r.u32()),
            Ok(format),
            "{name}: type id"
        );
        let blocks = r.u32() as usize;
        let elements = blocks * format.block_size();
        let bytes = r.take(format.row_bytes(elements).unwrap()).to_vec();
        let want = r.f32s(elements);
        r.finish(&name);

        let mut got = vec![f32::NAN; elements];
        dequantize_row(format, &bytes, &mut got).unwrap();
        assert_bits(&name, &got, &want);
        // Block by block, as rows of one block each.
        for (b, block) in bytes.chunks_exact(format.block_bytes()).enumerate() {
            let mut one = vec![f32::NAN; format.block_size()];
            dequantize_row(format, block, &mut one).unwrap();
            let at = b * format.block_size();
            assert_bits(&name, &one, &want[at..at + format.block_size()]);
        }
        eprintln!("{format}: {blocks} blocks bit-identical to gguf-py");
    }
}

#[test]
fn quantize_q8_0_matches_gguf_py_bit_for_bit() {
    let name = "quantize_q8_0.bin";
    let mut r = Reader::open(name, b"SLQ8");
    let n = r.u32() as usize;
    let x = r.f32s(n);
    let want = r.take(QuantFormat::Q8_0.row_bytes(n).unwrap()).to_vec();
    r.finish(name);

    let mut got = vec![0xAAu8; want.len()];
    quantize_row_q8_0(&x, &mut got).unwrap();
    for (b, (g, w)) in got.chunks(34).zip(want.chunks(34)).enumerate() {
        assert_eq!(
            g,
            w,
            "{name}: block {b} of inputs {:?}",
            &x[32 * b..32 * b + 32]
        );
    }
}

#[test]
fn quantize_q8_k_matches_ggml_reference() {
    let name = "quantize_q8_k.bin";
    let mut r = Reader::open(name, b"SLQK");
    let n = r.u32() as usize;
    let x = r.f32s(n);
    let mut got = Vec::new();
    quantize_row_q8_k(&x, &mut got).unwrap();
    assert_eq!(got.len(), n / 256);
    for (b, block) in got.iter().enumerate() {
        let d = r.f32s(1)[0];
        let qs: Vec<i8> = r.take(256).iter().map(|&q| q as i8).collect();
        let bsums: Vec<i16> = r
            .take(32)
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(block.d().to_bits(), d.to_bits(), "{name}: block {b} scale");
        assert_eq!(&block.qs()[..], &qs[..], "{name}: block {b} quants");
        assert_eq!(&block.bsums()[..], &bsums[..], "{name}: block {b} sums");
    }
    r.finish(name);
}
