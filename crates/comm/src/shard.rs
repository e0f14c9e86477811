//! Uneven shards: a tensor of `numel` elements over `p` ranks is padded to
//! `ceil(numel/p)·p`; rank `i` holds elements `[i·s, (i+1)·s)` of the padded
//! tensor, `s = ceil(numel/p)`. The padding is zero and never leaks out.

use crate::{Collectives, CommError, Communicator, Element, ReduceOp, Work};

/// How a flat tensor of `numel` elements is split over `parts` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    numel: usize,
    parts: usize,
}

impl Sharding {
    /// A sharding of `numel` elements over `parts` ranks (`parts >= 1`).
    pub fn new(numel: usize, parts: usize) -> Sharding {
        assert!(parts >= 1, "a sharding needs at least one part");
        Sharding { numel, parts }
    }

    /// Elements of the unpadded tensor.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Number of parts.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Elements each rank holds, padding included: `ceil(numel/parts)`.
    pub fn shard_len(&self) -> usize {
        self.numel.div_ceil(self.parts)
    }

    /// Elements of the padded tensor: `shard_len · parts`.
    pub fn padded_len(&self) -> usize {
        self.shard_len() * self.parts
    }

    /// The range of real (unpadded) elements rank `part` holds, in the
    /// coordinates of the full tensor; empty for an all-padding shard.
    pub fn range(&self, part: usize) -> std::ops::Range<usize> {
        let start = (part * self.shard_len()).min(self.numel);
        let end = ((part + 1) * self.shard_len()).min(self.numel);
        start..end
    }

    /// Rank `part`'s shard of `full`, zero-padded to `shard_len`.
    pub fn shard_of<E: Element>(&self, full: &[E], part: usize) -> Vec<E> {
        assert_eq!(
            full.len(),
            self.numel,
            "tensor length differs from the sharding's numel"
        );
        let mut shard = full[self.range(part)].to_vec();
        shard.resize(self.shard_len(), E::zeroed());
        shard
    }

    /// `full` zero-padded to `padded_len`.
    pub fn pad<E: Element>(&self, full: Vec<E>) -> Vec<E> {
        assert_eq!(
            full.len(),
            self.numel,
            "tensor length differs from the sharding's numel"
        );
        let mut padded = full;
        padded.resize(self.padded_len(), E::zeroed());
        padded
    }
}

/// All-gathers `shard` (of `sharding.shard_len()` elements) over `comm` and
/// drops the padding: the result has `sharding.numel()` elements.
pub fn all_gather_unpadded<E: Element, C: Communicator + ?Sized>(
    comm: &C,
    shard: Vec<E>,
    sharding: Sharding,
) -> Work<Vec<E>> {
    if let Err(err) = check(comm, &sharding, shard.len()) {
        return Work::failed(err);
    }
    let numel = sharding.numel();
    comm.all_gather(shard).map(move |mut full| {
        full.truncate(numel);
        Ok(full)
    })
}

/// Pads `full` (of `sharding.numel()` elements), reduce-scatters it over
/// `comm` and returns this rank's shard of `sharding.shard_len()` elements;
/// padding positions are zero.
pub fn reduce_scatter_padded<E: Element, C: Communicator + ?Sized>(
    comm: &C,
    full: Vec<E>,
    sharding: Sharding,
    op: ReduceOp,
) -> Work<Vec<E>> {
    if full.len() != sharding.numel() {
        let err = CommError::InvalidArgument(format!(
            "reduce_scatter_padded: tensor has {} elements, the sharding expects {}",
            full.len(),
            sharding.numel()
        ));
        return Work::failed(err);
    }
    if let Err(err) = check(comm, &sharding, sharding.shard_len()) {
        return Work::failed(err);
    }
    comm.reduce_scatter(sharding.pad(full), op)
}

fn check<C: Communicator + ?Sized>(
    comm: &C,
    sharding: &Sharding,
    shard_len: usize,
) -> Result<(), CommError> {
    if sharding.parts() != comm.size() {
        return Err(CommError::InvalidArgument(format!(
            "sharding over {} parts used on a group of {} ranks",
            sharding.parts(),
            comm.size()
        )));
    }
    if shard_len != sharding.shard_len() {
        return Err(CommError::InvalidArgument(format!(
            "shard has {shard_len} elements, the sharding of {} over {} expects {}",
            sharding.numel(),
            sharding.parts(),
            sharding.shard_len()
        )));
    }
    Ok(())
}
