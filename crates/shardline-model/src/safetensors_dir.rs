//! [`SafetensorsDir`]: the weights of a model directory, memory-mapped from `model.safetensors`
//! or from the shards listed in `model.safetensors.index.json`, and handed out in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use shardline_tensor::{DType, Shape};

use crate::error::{ModelError, Result};
use crate::files::read_json;
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
}

impl SafetensorsDir {
    /// Maps `dir/model.safetensors`, or every file named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
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
