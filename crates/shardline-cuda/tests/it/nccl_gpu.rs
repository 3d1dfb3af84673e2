//! NCCL on one GPU, at world size 1 (the machines these run on have one GPU): an all-reduce of
//! f32, f16 and bf16 buffers leaves them unchanged. Joining a communicator of two ranks that only
//! one rank joins fails at the deadline, naming the rank, instead of waiting forever.
//!
//! Needs a CUDA device and libnccl: the tests are ignored unless asked for (`--ignored`, as
//! scripts/gpu-check.sh runs them), and then fail where either is missing.

use crate::common;
use common::device;

use std::time::Duration;

use half::{bf16, f16};
use shardline_cuda::nccl::{self, DeviceComm, NcclElem, NcclId};
use shardline_cuda::CudaDevice;

/// The GPU and a one-rank communicator on it.
fn device_and_comm(test: &str) -> (CudaDevice, DeviceComm) {
    let dev = device(test);
    let (major, minor, patch) = nccl::version().unwrap_or_else(|e| panic!("{test}: {e}"));
    eprintln!("{test}: NCCL {major}.{minor}.{patch}");
    let id = NcclId::new().unwrap();
    // The id goes over the wire as bytes: make the communicator from the bytes.
    let id = NcclId::from_bytes(&id.to_bytes());
    let comm = DeviceComm::init(&dev, &id, 1, 0, Duration::from_secs(60)).unwrap();
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    (dev, comm)
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn joining_a_communicator_another_rank_never_joins_fails_at_the_deadline() {
    let test = "joining_alone_fails_at_the_deadline";
    // A one-rank communicator first: it proves the device and NCCL work here.
    let (dev, _comm) = device_and_comm(test);
    let id = NcclId::new().unwrap();
    let start = std::time::Instant::now();
    let err = DeviceComm::init(&dev, &id, 2, 0, Duration::from_secs(3))
        .err()
        .expect("rank 1 never joins");
    let waited = start.elapsed();
    let msg = err.to_string();
    assert!(
        msg.contains("rank 0 of 2") && msg.contains("within 3 s"),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}

fn unchanged<T: NcclElem + Copy + PartialEq + std::fmt::Debug>(
    dev: &CudaDevice,
    comm: &DeviceComm,
    data: &[T],
) {
    let mut buf = dev.upload(data).unwrap();
    comm.all_reduce_sum(dev, &mut buf).unwrap();
    comm.wait(dev).unwrap();
    assert_eq!(dev.download(&buf).unwrap(), data, "{:?}", T::DTYPE);
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn all_reduce_at_world_one_leaves_the_buffer_unchanged() {
    let (dev, comm) = device_and_comm("all_reduce_at_world_one");
    let v: Vec<f32> = (0..4099).map(|i| (i as f32 * 0.37).sin()).collect();
    unchanged(&dev, &comm, &v);
    unchanged(
        &dev,
        &comm,
        &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
    );
    unchanged(
        &dev,
        &comm,
        &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
    );
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn bad_ranks_are_errors_not_panics() {
    let (dev, _comm) = device_and_comm("bad_ranks_are_errors");
    let id = NcclId::new().unwrap();
    let e = DeviceComm::init(&dev, &id, 2, 2, Duration::from_secs(60))
        .err()
        .expect("rank 2 of 2");
    assert!(e.to_string().contains("rank 2 of 2"), "{e}");
}
