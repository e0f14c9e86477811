//! View ops on a sharded parameter stay lazy (no gather, still sharded) and,
//! once an op needs the values, give exactly what the same ops give on the
//! full tensor.

mod common;

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use common::{Dist, Ref};
use mics_backend::{MicsRuntime, MicsTensor, ShardInit, shard_module};
use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};

#[derive(Module, Debug)]
struct Holder<B: Backend> {
    w: Param<Tensor<B, 3>>,
}

const SHAPE: [usize; 3] = [2, 3, 5];

fn values() -> Vec<f32> {
    (0..30).map(|i| i as f32 * 0.5 - 3.0).collect()
}

fn is_sharded<const D: usize>(t: &Tensor<Dist, D>) -> bool {
    matches!(
        t.clone().inner().into_primitive(),
        TensorPrimitive::Float(MicsTensor::Sharded(_))
    )
}

type Chain<B> = fn(Tensor<B, 3>) -> Tensor<B, 4>;

fn chains<B: Backend>() -> Vec<(&'static str, Chain<B>)> {
    vec![
        ("reshape", |t| t.reshape([3, 2, 5, 1])),
        ("transpose", |t| t.transpose().unsqueeze()),
        ("swap_dims+permute", |t| {
            t.swap_dims(0, 2).permute([1, 0, 2]).unsqueeze_dim(1)
        }),
        ("slice+narrow", |t| {
            t.slice([0..2, 1..3, 1..5]).narrow(2, 1, 3).unsqueeze()
        }),
        ("unsqueeze+expand", |t| {
            t.unsqueeze_dim::<4>(0).expand([4, 2, 3, 5])
        }),
        ("squeeze", |t| {
            t.reshape([1, 2, 3, 5]).squeeze_dim::<3>(0).unsqueeze_dim(3)
        }),
    ]
}

#[test]
fn views_stay_lazy_and_gather_correctly() {
    let device = Default::default();
    let expected: Vec<Vec<f32>> = chains::<Ref>()
        .into_iter()
        .map(|(_, f)| {
            let t = Tensor::<Ref, 3>::from_data(TensorData::new(values(), SHAPE), &device);
            f(t).into_data().into_vec().unwrap()
        })
        .collect();
    let topology = Topology::new(4, 2, 4).unwrap();
    let results = ThreadsEngine::new(4)
        .ranks_per_node(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            let device = Default::default();
            let w = Tensor::<Dist, 3>::from_data(TensorData::new(values(), SHAPE), &device);
            let holder = Holder {
                w: Param::from_tensor(w.require_grad()),
            };
            let holder = shard_module(holder, &runtime, ShardInit::Identical);
            let mut got = Vec::new();
            for (name, f) in chains::<Dist>() {
                let before = runtime.counters().gathers;
                let view = f(holder.w.val());
                assert!(is_sharded(&view), "{name}: the view was materialised");
                assert_eq!(runtime.counters().gathers, before, "{name}: gathered");
                got.push(view.into_data().into_vec::<f32>().unwrap());
                assert_eq!(runtime.counters().gathers, before + 1, "{name}");
            }
            got
        })
        .unwrap();
    for rank in results {
        let got = rank.unwrap();
        for ((name, _), (g, e)) in chains::<Ref>().iter().zip(got.iter().zip(&expected)) {
            assert_eq!(g, e, "{name}");
        }
    }
}

#[test]
fn broadcast_init_gives_every_rank_rank_0_values() {
    let topology = Topology::new(4, 2, 2).unwrap();
    let results = ThreadsEngine::new(4)
        .ranks_per_node(2)
        .run(|world| {
            let world: Arc<dyn Communicator> = Arc::new(world);
            let rank = world.rank();
            let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
            let device = Default::default();
            let mine: Vec<f32> = values().iter().map(|v| v + rank as f32).collect();
            let w = Tensor::<Dist, 3>::from_data(TensorData::new(mine, SHAPE), &device);
            let holder = Holder {
                w: Param::from_tensor(w.require_grad()),
            };
            let holder = shard_module(holder, &runtime, ShardInit::BroadcastFromRank0);
            let plain = mics_backend::gather_module(holder);
            assert!(!is_sharded(&plain.w.val()));
            plain.w.val().into_data().into_vec::<f32>().unwrap()
        })
        .unwrap();
    for rank in results {
        assert_eq!(rank.unwrap(), values());
    }
}
