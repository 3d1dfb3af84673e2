//! NVRTC compilation of the kernel source, cached on disk by a hash of (source, architecture), so
//! only the first run on a machine pays the few hundred milliseconds of compilation.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::CudaError;

/// Where compiled PTX is kept: `$SHARDLINE_CACHE_DIR`, else `$XDG_CACHE_HOME/shardline`, else
/// `~/.cache/shardline`, else the system temp directory.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHARDLINE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("shardline");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("shardline");
    }
    std::env::temp_dir().join("shardline")
}

/// The NVRTC architecture name for a compute capability (unknown ones get compute_80 PTX, which
/// newer GPUs run).
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6) => "compute_86",
        (8, 0) => "compute_80",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ => "compute_80",
    }
}

/// Extra NVRTC options from `SHARDLINE_NVRTC_OPTIONS` (space-separated, e.g. `-DUNROLL=16`), for
/// tuning experiments; they are part of the cache key.
fn extra_options() -> Vec<String> {
    std::env::var("SHARDLINE_NVRTC_OPTIONS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// PTX for `source` compiled for `arch`.
pub fn compile(source: &str, arch: &'static str) -> Result<Ptx, CudaError> {
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(extra_options());
    let opts = CompileOptions {
        arch: Some(arch),
        options,
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile(e.to_string()))
}

/// PTX for `source` compiled for `compute_{major}{minor}`, from the cache when present.
pub fn compile_cached(source: &str, major: i32, minor: i32) -> Result<Ptx, CudaError> {
    let arch = arch_name(major, minor);
    let mut hasher = DefaultHasher::new();
    source.hash(&mut hasher);
    arch.hash(&mut hasher);
    extra_options().hash(&mut hasher);
    let path = cache_dir().join(format!("kernels-{arch}-{:016x}.ptx", hasher.finish()));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(text));
    }
    let ptx = compile(source, arch)?;
    // A cache that cannot be written only costs a recompilation next time.
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}
