//! [`SafetensorsDir`]: the weights of a model directory, memory-mapped from `model.safetensors`
//! or from the shards listed in `model.safetensors.index.json`, and handed out in place; fp8
//! matrices with block scales are handed out dequantized to bf16 ([`crate::fp8`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use shardline_tensor::{DType, Shape, TensorView};

use crate::error::{ModelError, Result};
use crate::files::read_json;
use crate::fp8::{dequantize, Fp8Blocks, SCALE_SUFFIX};
use crate::weights::{check_shape, TensorSource, Weight};

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
    /// Offset of the data block (after the 8-byte length and the JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// Every safetensors file of one model directory, mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    /// The block size of the fp8 matrices' scales, where `config.json` declares an fp8
    /// `quantization_config`.
    fp8: Option<Fp8Blocks>,
}

impl SafetensorsDir {
    /// Maps `dir/model.safetensors`, or every file named by `dir/model.safetensors.index.json`,
    /// and reads how fp8 weights are scaled from `dir/config.json`'s `quantization_config`
    /// (a directory without a config holds float weights).
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let config = dir.join("config.json");
        let fp8 = if config.is_file() {
            Fp8Blocks::from_config(&read_json(&config, 1 << 20)?, &config)?
        } else {
            None
        };
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.exists() {
            let v = read_json(&index_path, 64 << 20)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::config(&index_path, "missing `weight_map` object"))?;
            let mut files: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::config(
                        &index_path,
                        format!("weight_map entry `{tensor}` is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ModelError::config(
                        &index_path,
                        format!("weight_map entry `{tensor}` names `{file}`, outside the model directory"),
                    ));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut out = SafetensorsDir {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            index: HashMap::new(),
            fp8,
        };
        for name in names {
            let file = map_file(&dir.join(name))?;
            let i = out.files.len();
            for tensor in file.tensors.keys() {
                out.index.insert(tensor.clone(), i);
            }
            out.files.push(file);
        }
        Ok(out)
    }
}

impl MappedFile {
    /// The bytes of `info`'s tensor, whose range was checked against its shape and the file's
    /// length when the header was read.
    fn data(&self, info: &TensorInfo) -> &[u8] {
        let (a, b) = info.data_offsets;
        &self.map[self.data_start + a..self.data_start + b]
    }
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the file is opened read-only; like every mmap-based loader we assume nobody
    // truncates or rewrites a checkpoint while it is being served.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (header_len, meta) =
        SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(MappedFile {
        path: path.to_path_buf(),
        map: Arc::new(map),
        data_start: 8 + header_len,
        tensors,
    })
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl TensorSource for SafetensorsDir {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let Some(&fi) = self.index.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                origin: format!("the safetensors files of {}", self.dir.display()),
            });
        };
        let file = &self.files[fi];
        let info = &file.tensors[name];
        let origin = file.path.display().to_string();
        // The kernels do not read fp8: such a weight becomes bf16 here, once (see `crate::fp8`).
        // Its shape is checked before anything is sized by it.
        if info.dtype == Dtype::F8_E4M3 {
            check_shape(&origin, name, expected, &info.shape)?;
            return self.dequantized(file, name, &info.shape);
        }
        let dtype = dtype_of(info.dtype).ok_or_else(|| ModelError::TensorDType {
            origin: origin.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        check_shape(&origin, name, expected, &info.shape)?;
        let (a, b) = info.data_offsets;
        Ok(Weight::Mapped {
            dtype,
            shape: Shape::new(info.shape.clone()),
            map: file.map.clone(),
            range: file.data_start + a..file.data_start + b,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

impl SafetensorsDir {
    /// The F8_E4M3 tensor `name` of `file` (its `shape` already checked against the config's)
    /// dequantized with its block scales `name_scale_inv`, which may lie in another shard.
    fn dequantized(&self, file: &MappedFile, name: &str, shape: &[usize]) -> Result<Weight> {
        let origin = file.path.display().to_string();
        let err = |reason: String| ModelError::Quantized {
            origin: origin.clone(),
            name: name.to_string(),
            reason,
        };
        let &[n, k] = shape else {
            return Err(err(format!(
                "an F8_E4M3 tensor must be a matrix, this one has shape {shape:?}"
            )));
        };
        let Some(blocks) = self.fp8 else {
            return Err(err(format!(
                "it is stored as F8_E4M3, but {} declares no fp8 `quantization_config` (with \
                 `weight_block_size`) to say how it is scaled",
                self.dir.join("config.json").display()
            )));
        };
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let Some(&si) = self.index.get(&scale_name) else {
            return Err(err(format!(
                "it is stored as F8_E4M3, and its block scales `{scale_name}` are in no \
                 safetensors file of {}",
                self.dir.display()
            )));
        };
        let scale_file = &self.files[si];
        let scale_info = &scale_file.tensors[&scale_name];
        let scale_origin = scale_file.path.display().to_string();
        let scale_dtype = dtype_of(scale_info.dtype).ok_or_else(|| ModelError::TensorDType {
            origin: scale_origin.clone(),
            name: scale_name.clone(),
            dtype: format!("{:?}", scale_info.dtype),
        })?;
        let scale_shape = blocks.scale_shape([n, k]);
        if scale_info.shape != scale_shape {
            return Err(err(format!(
                "its block scales `{scale_name}` (in {scale_origin}) have shape {:?}, expected \
                 {scale_shape:?}: one per {}x{} block of its [{n}, {k}]",
                scale_info.shape, blocks.rows, blocks.cols
            )));
        }
        let scale_shape = Shape::new(scale_shape.to_vec());
        let scales = TensorView::new(scale_dtype, &scale_shape, scale_file.data(scale_info))
            .map_err(|e| err(e.to_string()))?
            .to_f32_vec();
        let t = dequantize(
            &origin,
            name,
            file.data(&file.tensors[name]),
            [n, k],
            &scales,
            blocks,
            DType::BF16,
        )?;
        Ok(Weight::Owned(t))
    }
}
