//! `Mics<B>`: MiCS sharded data parallelism as a Burn backend decorator.
//!
//! Train any Burn model on `Autodiff<Mics<B>>`: [`shard_module`] splits each
//! float parameter over this rank's *partition group* (p ranks, each keeping
//! `ceil(numel/p)` elements), the forward and backward passes gather a
//! parameter inside its group right before an op computes on it and drop it
//! after, and [`ShardedOptimizer`] syncs gradients in two hops (reduce-scatter
//! inside the partition group every micro-step, one all-reduce across the
//! replication group per optimizer step) and runs Burn's own AdamW or SGD on
//! the shards. [`gather_module`] gives back a plain module for export.
//!
//! # Design
//!
//! - The float primitive ([`MicsTensor`]) is a local tensor of `B` or a
//!   sharded parameter: this rank's padded shard, the logical shape, the
//!   parameter id and an `Arc` to the rank's [`MicsRuntime`] (its groups,
//!   prefetcher and counters). Int, bool and quantized primitives are `B`'s.
//! - View ops (reshape, swap_dims/transpose, permute, slice/narrow,
//!   unsqueeze/squeeze, expand) on a sharded parameter stay lazy, so what
//!   Autodiff saves for backward is the shard handle; every other op gathers
//!   (`gather.rs`) and applies the views to the gathered tensor.
//! - The delegation of Burn's ~370 ops is generated (`gen/delegate.py` →
//!   `src/ops/delegate.rs`); the few ops written by hand are in `ops/manual.rs`.
//! - Prefetch ([`PrefetchConfig`]): the first step records the order of
//!   gathers; later steps gather ahead within a depth and a byte budget, and
//!   fall back to on-demand gathers when the order changes.
//! - Counters per rank ([`Counters`]): gathers, prefetch hits and misses,
//!   bytes gathered (in compute and in wire precision), live and peak live gathered bytes, shard bytes, live and
//!   peak live full-gradient bytes.
//! - Gradients are packed into buckets as they become complete and each
//!   bucket's reduce-scatter starts at once. With the cargo feature
//!   `early-reduce`, Burn 0.21's `distributed` hook hands each sharded
//!   parameter's gradient over during backward, so the full gradients held
//!   stay within a few buckets instead of the whole model. It is off by
//!   default because Burn's `distributed` feature makes `Autodiff<B>` an
//!   autodiff backend only for `B: DistributedBackend`, which NdArray is not
//!   (see the crate's README).
//!
//! Every rank of a partition group must run the same program (the same ops
//! on the same parameters, in the same order), as with any ZeRO-3-style
//! sharding: gathers are collectives. A failed collective panics (Burn's ops
//! cannot return errors) with a message naming the collective, the
//! parameter(s), the group's world ranks and the engine's error; the engines
//! fail the collective on every rank, so every rank panics instead of hanging.
//!
//! # Mixed precision
//!
//! [`MicsRuntime::with_precision`] sets the element types of the
//! collectives ([`Precision`]): with [`Precision::BF16`] parameters are
//! all-gathered in bf16 (half the bytes of f32 on the wire;
//! [`Counters::bytes_gathered_wire`] and the engines' `CommStats` show it)
//! and gradients are reduce-scattered and all-reduced in bf16, while the
//! shards stay f32 master copies, gradients accumulate in f32 and AdamW's
//! moments are f32. Compute keeps the parameters' dtype: the gathered bf16
//! values are widened back, so the forward and backward passes see
//! bf16-rounded weights (NdArray has no bf16 tensors; on a backend that has
//! them, build the model in bf16 for bf16 compute). For f16,
//! [`ShardedOptimizer::with_loss_scale`] scales the loss
//! ([`LossScale::Static`] or [`LossScale::Dynamic`], which skips steps whose
//! gradients overflowed and halves the scale).
//!
//! ```
//! # use std::sync::Arc;
//! # use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};
//! use mics_backend::{LossScale, MicsRuntime, PrefetchConfig, Precision};
//! # ThreadsEngine::new(1).run(|world| {
//! # let world: Arc<dyn Communicator> = Arc::new(world);
//! # let groups = MicsGroups::new(world, Topology::new(1, 1, 1).unwrap()).unwrap();
//! let runtime = MicsRuntime::with_precision(groups, PrefetchConfig::disabled(), Precision::BF16);
//! assert_eq!(runtime.precision(), Precision::BF16);
//! # }).unwrap();
//! ```
//!
//! # Randomness
//!
//! In-process ranks are threads, and inner backends such as NdArray keep one
//! process-wide random generator, so the values a rank draws (Burn's
//! `Dropout` masks come from `float_random` with a Bernoulli distribution)
//! would depend on how the rank threads interleave. `Mics<B>` owns its
//! randomness instead: `Mics::<B>::seed(device, seed)` (also reached through
//! `Autodiff<Mics<B>>::seed`) stores a generator (`rand`'s `StdRng` seeded
//! from `seed`) in a thread-local of the calling thread, and still seeds `B`.
//! `float_random` and `int_random` on that thread then draw from it
//! (Burn's `TensorData::random`, built on the host and uploaded with
//! `B::float_from_data` / `B::int_from_data`); a thread that never called
//! `seed` draws from `B`'s generator as before. So ranks that seed alike
//! draw identical masks and a rerun repeats them; seed each rank with, e.g.,
//! `base + rank` for masks that differ across ranks. Random draws happen on
//! the thread that runs the op: seed the rank's own thread.
//!
//! # Example: shard and train a custom model on 4 ranks (p = 2)
//!
//! ```
//! use std::sync::Arc;
//!
//! use burn::backend::{Autodiff, NdArray};
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig, Relu};
//! use burn::optim::AdamWConfig;
//! use burn::tensor::{Tensor, backend::Backend};
//! use mics_backend::{Mics, MicsRuntime, ShardInit, ShardedOptimizer, gather_module, shard_module};
//! use mics_comm::{Communicator, MicsGroups, ThreadsEngine, Topology};
//!
//! #[derive(Module, Debug)]
//! struct Mlp<B: Backend> {
//!     a: Linear<B>,
//!     b: Linear<B>,
//!     act: Relu,
//! }
//!
//! impl<B: Backend> Mlp<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.b.forward(self.act.forward(self.a.forward(x)))
//!     }
//! }
//!
//! type B = Autodiff<Mics<NdArray>>;
//!
//! let topology = Topology::new(4, 4, 2).unwrap();
//! let ranks = ThreadsEngine::new(4).run(|world| {
//!     let world: Arc<dyn Communicator> = Arc::new(world);
//!     let rank = world.rank();
//!     let runtime = MicsRuntime::new(MicsGroups::new(world, topology).unwrap());
//!     let device = Default::default();
//!     B::seed(&device, 42); // the same initial values on every rank
//!     let model = Mlp {
//!         a: LinearConfig::new(3, 8).init::<B>(&device),
//!         b: LinearConfig::new(8, 1).init(&device),
//!         act: Relu::new(),
//!     };
//!     let mut model = shard_module(model, &runtime, ShardInit::BroadcastFromRank0);
//!     let mut optim = ShardedOptimizer::adamw(&AdamWConfig::new(), &runtime);
//!     for step in 0..3 {
//!         runtime.begin_step();
//!         let x = Tensor::<B, 2>::ones([2, 3], &device) * (rank + step) as f32;
//!         let loss = model.forward(x).powi_scalar(2).mean();
//!         optim.accumulate(&model, loss.backward()); // one micro-step
//!         model = optim.step(1e-3, model); // the accumulation boundary
//!     }
//!     assert!(runtime.counters().shard_bytes < (3 * 8 + 8 + 8 + 1) * 4);
//!     let plain = gather_module(model); // full parameters, e.g. to save
//!     assert_eq!(plain.a.weight.val().dims(), [3, 8]);
//! });
//! for rank in ranks.unwrap() {
//!     rank.unwrap(); // a rank that panicked reports its message here
//! }
//! ```

mod backend;
#[cfg(feature = "early-reduce")]
mod early;
pub mod extension;
mod gather;
mod host_adamw;
mod ops;
mod optim;
mod precision;
mod prefetch;
mod random;
mod reduce;
mod runtime;
mod shard;
mod staging;
mod state;
mod tensor;

pub use backend::Mics;
pub use optim::{LossScale, LossScaleState, ShardedOptimizer};
pub use precision::Precision;
pub use runtime::{Counters, MicsRuntime, PrefetchConfig};
pub use shard::{ShardInit, gather_module, shard_module};
pub use state::{ParamShardState, StateError};
pub use tensor::{MicsTensor, ShardedTensor};
