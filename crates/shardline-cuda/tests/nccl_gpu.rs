//! NCCL on one GPU, at world size 1 (the machines these run on have one GPU): an all-reduce of
//! f32, f16 and bf16 buffers leaves them unchanged, and a layer stack that sums each segment
//! through a one-rank communicator computes what it computes without one, in both execution
//! modes (in split mode with the all-reduce captured in the graphs when NCCL lets it).
//!
//! Joining a communicator of two ranks that only one rank joins fails at the deadline, naming the
//! rank, instead of waiting forever.
//!
//! Needs a CUDA device and libnccl: without them each test prints that it did not run and why.

mod common;
use common::device;

use std::time::Duration;

use half::{bf16, f16};
use shardline_cuda::nccl::{self, DeviceComm, NcclElem, NcclId};
use shardline_cuda::{CudaDevice, DeviceLayer, ExecMode, FfnShape, LayerShape, LayerStack};
use shardline_tensor::DType;

/// The GPU and a one-rank communicator on it, or why this test does not run here.
fn device_and_comm(test: &str) -> Option<(CudaDevice, DeviceComm)> {
    let dev = device(test)?;
    match nccl::version() {
        Ok((major, minor, patch)) => eprintln!("{test}: NCCL {major}.{minor}.{patch}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            return None;
        }
    }
    let id = NcclId::new().unwrap();
    // The id goes over the wire as bytes: make the communicator from the bytes.
    let id = NcclId::from_bytes(&id.to_bytes());
    let comm = DeviceComm::init(&dev, &id, 1, 0, Duration::from_secs(60)).unwrap();
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    Some((dev, comm))
}

#[test]
fn joining_a_communicator_another_rank_never_joins_fails_at_the_deadline() {
    let test = "joining_alone_fails_at_the_deadline";
    // A one-rank communicator first: it proves the device and NCCL work here.
    let Some((dev, _comm)) = device_and_comm(test) else {
        return;
    };
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
fn all_reduce_at_world_one_leaves_the_buffer_unchanged() {
    let Some((dev, comm)) = device_and_comm("all_reduce_at_world_one") else {
        return;
    };
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
fn bad_ranks_are_errors_not_panics() {
    let Some((dev, _comm)) = device_and_comm("bad_ranks_are_errors") else {
        return;
    };
    let id = NcclId::new().unwrap();
    let e = DeviceComm::init(&dev, &id, 2, 2, Duration::from_secs(60))
        .err()
        .expect("rank 2 of 2");
    assert!(e.to_string().contains("rank 2 of 2"), "{e}");
}

#[test]
fn a_stack_summing_through_nccl_at_world_one_matches_one_without() {
    let Some((dev, comm)) = device_and_comm("stack_with_nccl_at_world_one") else {
        return;
    };
    let shape = LayerShape {
        hidden: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        qk_norm: false,
        qkv_bias: false,
        rope_theta: 10000.0,
        eps: 1e-5,
        capacity: 16,
    };
    let ffn = FfnShape::Moe {
        n_experts: 4,
        top_k: 2,
        intermediate: 128,
        renormalize: true,
        shared_intermediate: None,
    };
    let stack = |dev: &CudaDevice| {
        let layers = (0..3)
            .map(|l| DeviceLayer::random(dev, &shape, &ffn, DType::BF16, 7 + l).unwrap())
            .collect();
        let mut s = LayerStack::new(dev, shape.clone(), layers).unwrap();
        s.set_position(dev, 5).unwrap();
        s
    };
    let x: Vec<f32> = (0..shape.hidden).map(|i| (i as f32 * 0.1).cos()).collect();
    let mut plain = stack(&dev);
    let mut summed = stack(&dev);
    summed.set_comm(&dev, comm).unwrap();
    for mode in [ExecMode::PerOp, ExecMode::Split] {
        for s in [&mut plain, &mut summed] {
            s.set_hidden(&dev, &x).unwrap();
            s.step(&dev, mode).unwrap();
        }
        let (a, b) = (plain.hidden(&dev).unwrap(), summed.hidden(&dev).unwrap());
        assert_eq!(a, b, "{mode:?}");
    }
    eprintln!(
        "NCCL all-reduce captured inside the segment graphs: {:?}",
        summed.comm_in_graph()
    );
    // One segment at a time (the model engine's path): the partial sums come back unchanged.
    let (mut pa, mut pb) = (vec![0.0f32; shape.hidden], vec![0.0f32; shape.hidden]);
    plain.attention(&dev, 0, &x, &mut pa).unwrap();
    summed.attention(&dev, 0, &x, &mut pb).unwrap();
    assert_eq!(pa, pb);
    plain.ffn(&dev, 1, &x, &mut pa).unwrap();
    summed.ffn(&dev, 1, &x, &mut pb).unwrap();
    assert_eq!(pa, pb);
}
