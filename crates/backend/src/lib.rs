//! `Mics<B>`: MiCS sharded data parallelism as a Burn backend decorator.

mod backend;
mod gather;
mod ops;
mod optim;
mod prefetch;
mod runtime;
mod shard;
mod tensor;

pub use backend::Mics;
pub use optim::ShardedOptimizer;
pub use runtime::{Counters, MicsRuntime, PrefetchConfig};
pub use shard::{ShardInit, gather_module, shard_module};
pub use tensor::{MicsTensor, ShardedTensor};
