//! Runtime choice of the SIMD instruction set and the entry points that run a kernel body with
//! that instruction set's target features enabled.
//!
//! A kernel body is written once, generic over `lanes::Simd` (a vector of f32 lanes), and
//! implements `WithSimd`; `run` monomorphises it for AVX-512, AVX2+FMA+F16C or plain scalar
//! code inside a `#[target_feature]` function, so the vector operations inline into it.

pub(crate) mod exp;
pub(crate) mod lanes;
pub(crate) mod reduce;
pub(crate) mod tile;
pub(crate) mod weight;

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use lanes::{Avx2, Avx512};
use lanes::{Scalar, Simd};

/// The instruction sets the kernels have code paths for, from the widest down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F/BW/VL (16 f32 lanes); f16 weights widened with `vcvtph2ps`, bf16 by a shift.
    Avx512,
    /// AVX2 with FMA and F16C (8 f32 lanes).
    Avx2,
    /// Portable scalar code: the fallback on any other CPU.
    Scalar,
}

impl Isa {
    /// Every path, widest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Scalar];

    /// The name used by `SHARDLINE_ISA` and the benchmarks.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest path this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    /// The path kernels use: [`Isa::best`], unless the environment variable `SHARDLINE_ISA`
    /// (`avx512`, `avx2` or `scalar`) asks for a narrower one, e.g. to measure the AVX2 path on
    /// an AVX-512 machine. An unknown or unsupported name is reported once on stderr and ignored.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::best();
            let Ok(name) = std::env::var("SHARDLINE_ISA") else {
                return best;
            };
            match Isa::ALL.into_iter().find(|i| i.name() == name.trim()) {
                Some(isa) if isa.is_supported() => isa,
                Some(isa) => {
                    tracing::warn!(
                        "SHARDLINE_ISA={} is not supported by this CPU; using {}",
                        isa.name(),
                        best.name()
                    );
                    best
                }
                None => {
                    tracing::warn!(
                        "SHARDLINE_ISA={name:?} is not one of avx512, avx2, scalar; \
                         using {}",
                        best.name()
                    );
                    best
                }
            }
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel body generic over the vector type. `run` must be `#[inline(always)]` so that it
/// inlines into the `#[target_feature]` entry point [`run`] picks.
pub(crate) trait WithSimd {
    type Output;
    fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `op` on `isa`.
///
/// # Panics
/// When `isa` is not supported by this CPU (running it would be undefined behaviour); callers
/// pass [`Isa::active`] or a path they checked with [`Isa::is_supported`].
pub(crate) fn run<K: WithSimd>(isa: Isa, op: K) -> K::Output {
    match isa {
        Isa::Scalar => op.run::<Scalar>(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.is_supported(), "the CPU lacks AVX2/FMA/F16C");
            // SAFETY: the CPU supports every feature the function enables (checked above).
            unsafe { run_avx2(op) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.is_supported(), "the CPU lacks AVX-512F/BW/VL");
            // SAFETY: as above.
            unsafe { run_avx512(op) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => panic!("{isa} is not available on this architecture"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<K: WithSimd>(op: K) -> K::Output {
    op.run::<Avx2>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn run_avx512<K: WithSimd>(op: K) -> K::Output {
    op.run::<Avx512>()
}
