//! A failed collective inside a Burn op panics (Burn's ops cannot return
//! errors) on every rank, with a message that names the collective, the
//! parameter, the partition group and the engine's error; no rank hangs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::nn::LinearConfig;
use burn::tensor::Tensor;
use common::Dist;
use mics_backend::{MicsRuntime, ShardInit, shard_module};
use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};

#[test]
fn gather_failure_panics_on_every_rank_with_context() {
    let ids = Mutex::new(vec![Vec::new(); 2]);
    let start = Instant::now();
    let results = ThreadsEngine::new(2)
        .timeout(Duration::from_secs(10))
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let topology = Topology::new(2, 2, 2).unwrap();
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            let device = Default::default();
            // Rank 1 builds a wider layer than rank 0 (not the same program):
            // the first gather of the forward pass does not match.
            let linear = LinearConfig::new(3, 4 + 2 * rank).init::<Dist>(&device);
            let linear = shard_module(linear, &runtime, ShardInit::Identical);
            let mut mine = vec![linear.weight.id.to_string()];
            mine.extend(linear.bias.as_ref().map(|b| b.id.to_string()));
            ids.lock().unwrap()[rank] = mine;
            let x = Tensor::<Dist, 2>::ones([1, 3], &device);
            linear.forward(x).sum().into_scalar()
        })
        .unwrap();
    // The engine detects the mismatch at once; a hang would take the timeout.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let ids = ids.into_inner().unwrap();
    for (rank, result) in results.iter().enumerate() {
        let message = match result {
            Ok(value) => panic!("rank {rank} did not fail: {value}"),
            Err(message) => message,
        };
        assert!(
            message.contains("mics: all-gather of parameter"),
            "rank {rank}: {message}"
        );
        assert!(
            ids[rank].iter().any(|id| message.contains(id.as_str())),
            "rank {rank} names none of its parameters {:?}: {message}",
            ids[rank]
        );
        assert!(
            message.contains("partition group [0, 1]"),
            "rank {rank}: {message}"
        );
        // The engine's error: the arguments of the two ranks differ.
        assert!(
            message.contains("but rank 0 passed"),
            "rank {rank}: {message}"
        );
    }
}
