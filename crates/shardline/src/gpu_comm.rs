//! How ranks on GPUs sum the segments' partial sums: on the devices through NCCL, or through the
//! host (copy to the host, all-reduce over the `shardline-comm` group). `--gpu-comm` picks one;
//! `auto` takes NCCL when it loads on every rank and every rank has a GPU of its own.
//!
//! The ranks agree through the group: each rank says where it runs (host, then its GPU's UUID and
//! whether libnccl loads there), every rank makes the same choice from the same table, and for
//! NCCL rank 0's unique id is broadcast to the others. That exchange is plain bytes and needs no
//! GPU, so it is tested without one.

use std::hash::{DefaultHasher, Hash, Hasher};

use anyhow::Context;
use shardline_comm::Group;

/// `--gpu-comm`: how the segments' partial sums are summed across GPU ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuComm {
    /// NCCL when there are several ranks, libnccl loads on every rank and no two ranks share a
    /// GPU; the host otherwise.
    Auto,
    /// NCCL on the GPUs' stream (an error where it cannot be used, saying why). At one rank it
    /// forms a one-rank communicator.
    Nccl,
    /// Copy each segment's output to the host and all-reduce it over the comm group.
    Host,
}

/// What the ranks chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Nccl,
    Host,
}

/// What one rank tells the others before they choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankGpu {
    /// Whether libnccl loaded on this rank.
    pub nccl_loads: bool,
    /// The UUID of this rank's GPU.
    pub uuid: [u8; 16],
}

/// The choice every rank makes from the same table `ranks` (indexed by rank); an error says why
/// NCCL was asked for and cannot be used.
pub fn choose(want: GpuComm, ranks: &[RankGpu]) -> anyhow::Result<Choice> {
    if want == GpuComm::Host || (want == GpuComm::Auto && ranks.len() < 2) {
        return Ok(Choice::Host);
    }
    let mut why = Vec::new();
    let missing: Vec<String> = (0..ranks.len())
        .filter(|&r| !ranks[r].nccl_loads)
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        why.push(format!(
            "libnccl does not load on rank(s) {}",
            missing.join(", ")
        ));
    }
    for (i, a) in ranks.iter().enumerate() {
        if let Some(j) = (i + 1..ranks.len()).find(|&j| ranks[j].uuid == a.uuid) {
            why.push(format!(
                "ranks {i} and {j} share one GPU (UUID {}), and NCCL needs a GPU per rank",
                hex(&a.uuid)
            ));
            break;
        }
    }
    match (why.is_empty(), want) {
        (true, _) => Ok(Choice::Nccl),
        (false, GpuComm::Auto) => Ok(Choice::Host),
        (false, _) => anyhow::bail!("--gpu-comm nccl cannot be used: {}", why.join("; ")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes as 32-bit words in f32 values, for the group's collectives (which move f32 values bit
/// for bit: gathers and broadcasts copy, they do no arithmetic).
fn to_words(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            f32::from_bits(u32::from_le_bytes(w))
        })
        .collect()
}

fn from_words(words: &[f32]) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.to_bits().to_le_bytes())
        .collect()
}

/// Every rank's `mine` (all the same length), in rank order.
fn gather_bytes(group: &Group, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let local = to_words(mine);
    let mut all = vec![0.0f32; local.len() * group.size()];
    group
        .all_gather(&local, &mut all)
        .context("exchanging the ranks' GPU placement")?;
    Ok(all
        .chunks_exact(local.len())
        .map(|w| from_words(w)[..mine.len()].to_vec())
        .collect())
}

/// This rank's index among the ranks on its host (ranks are told apart by host name).
pub fn local_rank(group: Option<&Group>) -> anyhow::Result<usize> {
    let Some(group) = group else {
        return Ok(0);
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut h = DefaultHasher::new();
    host.trim().hash(&mut h);
    let all = gather_bytes(group, &h.finish().to_le_bytes())?;
    let me = &all[group.rank()];
    Ok(all[..group.rank()].iter().filter(|o| *o == me).count())
}

/// Every rank's [`RankGpu`], in rank order.
pub fn gather_gpus(group: Option<&Group>, mine: RankGpu) -> anyhow::Result<Vec<RankGpu>> {
    let Some(group) = group else {
        return Ok(vec![mine]);
    };
    let mut bytes = vec![mine.nccl_loads as u8];
    bytes.extend(mine.uuid);
    Ok(gather_bytes(group, &bytes)?
        .into_iter()
        .map(|b| RankGpu {
            nccl_loads: b[0] != 0,
            uuid: b[1..17].try_into().unwrap_or_default(),
        })
        .collect())
}

/// Bytes of the id [`share_id`] moves (NCCL's unique id).
pub const ID_BYTES: usize = 128;

/// Rank 0's `make()` on every rank. If rank 0 cannot make it, every rank fails (none waits).
pub fn share_id(
    group: Option<&Group>,
    make: impl FnOnce() -> anyhow::Result<[u8; ID_BYTES]>,
) -> anyhow::Result<[u8; ID_BYTES]> {
    let Some(group) = group else {
        return make();
    };
    // A status byte, then the id.
    let mut msg = [0u8; 1 + ID_BYTES];
    let made = if group.rank() == 0 {
        let made = make();
        if let Ok(id) = &made {
            msg[0] = 1;
            msg[1..].copy_from_slice(id);
        }
        Some(made)
    } else {
        None
    };
    let mut words = to_words(&msg);
    group
        .broadcast(&mut words, 0)
        .context("sending the NCCL unique id from rank 0")?;
    if let Some(made) = made {
        return made;
    }
    let got = from_words(&words);
    anyhow::ensure!(got[0] == 1, "rank 0 could not make the NCCL unique id");
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(&got[1..1 + ID_BYTES]);
    Ok(id)
}

#[cfg(feature = "cuda")]
pub use gpu::cuda_backend;

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Duration;

    use anyhow::Context;
    use shardline_comm::Group;
    use shardline_cuda::nccl::{self, DeviceComm, NcclId};
    use shardline_cuda::CudaDevice;
    use shardline_model::backend::cuda::CudaBackend;
    use shardline_model::load::ModelWeights;
    use shardline_model::ModelSpec;

    use super::{choose, gather_gpus, local_rank, share_id, Choice, GpuComm, RankGpu};

    /// This rank's [`CudaBackend`] (KV caches for `positions`) on its GPU, summing across the
    /// ranks on the GPUs when they choose NCCL under `want`. A collective: every rank calls it.
    pub fn cuda_backend(
        spec: ModelSpec,
        weights: ModelWeights,
        positions: usize,
        group: Option<&Group>,
        want: GpuComm,
    ) -> anyhow::Result<CudaBackend> {
        let ordinal = gpu_ordinal(group)?;
        let mut backend = CudaBackend::new(spec, weights, ordinal, positions)?;
        if let Some(comm) = device_comm(backend.device(), group, want)? {
            backend.set_device_comm(comm)?;
        }
        Ok(backend)
    }

    /// The GPU of this rank: its index among the ranks on this host, modulo the GPUs there.
    fn gpu_ordinal(group: Option<&Group>) -> anyhow::Result<usize> {
        let count = shardline_cuda::device::device_count()?;
        anyhow::ensure!(count > 0, "no CUDA device found");
        Ok(local_rank(group)? % count)
    }

    /// The NCCL communicator of the job's ranks on their GPUs (`dev` is this rank's), when the
    /// ranks choose NCCL under `want`; `None` when they sum through the host. A collective: every
    /// rank calls it.
    fn device_comm(
        dev: &CudaDevice,
        group: Option<&Group>,
        want: GpuComm,
    ) -> anyhow::Result<Option<DeviceComm>> {
        if want == GpuComm::Host {
            return Ok(None);
        }
        let loads = nccl::version();
        let mine = RankGpu {
            nccl_loads: loads.is_ok(),
            uuid: nccl::gpu_uuid(dev)?,
        };
        let ranks = gather_gpus(group, mine)?;
        let choice = choose(want, &ranks).map_err(|e| match &loads {
            Err(why) => e.context(format!("on this rank: {why}")),
            Ok(_) => e,
        })?;
        if choice == Choice::Host {
            return Ok(None);
        }
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.size()));
        let id = share_id(group, || Ok(NcclId::new()?.to_bytes()))?;
        let timeout = group.map_or(Duration::from_secs(60), Group::timeout);
        let mut comm = DeviceComm::init(dev, &NcclId::from_bytes(&id), world, rank, timeout)
            .context("cannot form the NCCL communicator")?;
        if let Some(g) = group {
            comm.watch_peers(Box::new(g.watcher()));
        }
        if rank == 0 {
            if let Ok((major, minor, patch)) = loads {
                tracing::info!(
                    "gpu-comm: NCCL {major}.{minor}.{patch}, {world} rank(s), all-reduce on the GPUs"
                );
            }
        }
        Ok(Some(comm))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shardline_comm::{Config, TransportChoice};

    use super::*;

    fn gpu(nccl_loads: bool, uuid: u8) -> RankGpu {
        RankGpu {
            nccl_loads,
            uuid: [uuid; 16],
        }
    }

    #[test]
    fn auto_takes_nccl_only_with_a_gpu_per_rank_and_nccl_everywhere() {
        let own = [gpu(true, 1), gpu(true, 2)];
        assert_eq!(choose(GpuComm::Auto, &own).unwrap(), Choice::Nccl);
        assert_eq!(choose(GpuComm::Host, &own).unwrap(), Choice::Host);
        let shared = [gpu(true, 1), gpu(true, 1)];
        assert_eq!(choose(GpuComm::Auto, &shared).unwrap(), Choice::Host);
        let no_lib = [gpu(true, 1), gpu(false, 2)];
        assert_eq!(choose(GpuComm::Auto, &no_lib).unwrap(), Choice::Host);
        // One rank has nothing to sum: auto stays on the host, an explicit nccl forms a comm.
        assert_eq!(choose(GpuComm::Auto, &own[..1]).unwrap(), Choice::Host);
        assert_eq!(choose(GpuComm::Nccl, &own[..1]).unwrap(), Choice::Nccl);
    }

    #[test]
    fn nccl_that_cannot_work_is_an_error_saying_why() {
        let e = choose(GpuComm::Nccl, &[gpu(true, 7), gpu(true, 3), gpu(true, 7)]).unwrap_err();
        assert!(e.to_string().contains("ranks 0 and 2 share one GPU"), "{e}");
        let e = choose(GpuComm::Nccl, &[gpu(true, 1), gpu(false, 2)]).unwrap_err();
        assert!(
            e.to_string().contains("libnccl does not load on rank(s) 1"),
            "{e}"
        );
    }

    #[test]
    fn bytes_survive_the_f32_words_bit_for_bit() {
        // Every byte value, including the NaN bit patterns of f32.
        let bytes: Vec<u8> = (0..=255u8).chain([0xff, 0xff, 0xc0, 0x7f, 0x01]).collect();
        assert_eq!(from_words(&to_words(&bytes))[..bytes.len()], bytes[..]);
    }

    /// Runs `f(group)` on `world` thread ranks joined over TCP.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(Group) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .to_string();
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let mut c = Config::new(rank, world, addr.clone(), "gpu-comm-test");
                c.timeout = Duration::from_secs(20);
                c.transport = TransportChoice::Tcp;
                let f = f.clone();
                std::thread::spawn(move || f(Group::init(&c).unwrap()))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn rank_zeros_id_reaches_every_rank_and_placement_is_shared() {
        let fake: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let out = on_ranks(3, move |g| {
            let id = share_id(Some(&g), || {
                assert_eq!(g.rank(), 0, "only rank 0 makes the id");
                Ok(fake)
            })
            .unwrap();
            let mine = gpu(g.rank() != 2, g.rank() as u8);
            let table = gather_gpus(Some(&g), mine).unwrap();
            (id, table, local_rank(Some(&g)).unwrap())
        });
        for (rank, (id, table, local)) in out.iter().enumerate() {
            assert_eq!(id, &fake);
            assert_eq!(table, &[gpu(true, 0), gpu(true, 1), gpu(false, 2)]);
            // All three threads run on this host.
            assert_eq!(*local, rank);
        }
    }

    #[test]
    fn a_failure_to_make_the_id_fails_every_rank_without_a_hang() {
        let out = on_ranks(2, |g| {
            share_id(Some(&g), || anyhow::bail!("no libnccl here"))
                .unwrap_err()
                .to_string()
        });
        assert!(out[0].contains("no libnccl here"), "{}", out[0]);
        assert!(out[1].contains("rank 0 could not make"), "{}", out[1]);
    }
}
