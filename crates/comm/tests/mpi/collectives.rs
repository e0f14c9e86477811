//! Every collective of one element type against a naive single-process
//! reference and against the threads engine, bit for bit; the inputs and the
//! reference.

use std::sync::Arc;

use mics_comm::mpi::MpiComm;
use mics_comm::{Collectives, CommError, Communicator, Element, ReduceOp, ThreadsEngine, Work};

use crate::Checks;

// ---------------------------------------------------------------------
// Inputs and the naive reference.

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Values in [-4, 4) with full mantissas, so that the order of a sum
/// shows in its rounding.
pub fn input<E: Element>(seed: u64, rank: usize, len: usize) -> Vec<E> {
    (0..len)
        .map(|i| {
            let h = splitmix(seed ^ ((rank as u64) << 48) ^ (i as u64).wrapping_mul(0x1000_0001));
            E::from_f32(((h >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0)
        })
        .collect()
}

pub use crate::common::reference_reduce as reference;

pub fn same_bits<E: Element>(a: &[E], b: &[E]) -> bool {
    a.len() == b.len() && bytemuck::cast_slice::<E, u8>(a) == bytemuck::cast_slice::<E, u8>(b)
}

pub fn describe<E: Element>(got: &Result<Vec<E>, CommError>, want: &[E]) -> String {
    match got {
        Err(err) => format!("error: {err}"),
        Ok(got) if got.len() != want.len() => {
            format!("{} elements, expected {}", got.len(), want.len())
        }
        Ok(got) => {
            let i = (0..got.len())
                .find(|&i| bytemuck::bytes_of(&got[i]) != bytemuck::bytes_of(&want[i]))
                .unwrap_or(0);
            format!(
                "element {i}: got {:?}, expected {:?}",
                got.get(i),
                want.get(i)
            )
        }
    }
}

pub const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

/// Results of one rank for one round of collectives.
pub struct Round<E> {
    gathered: Vec<E>,
    scattered: Vec<Vec<E>>,
    reduced: Vec<Vec<E>>,
    broadcast: Vec<E>,
}

/// Issues every collective at once (they queue in order), then waits in
/// reverse order.
pub fn round<E: Element, C: Communicator + ?Sized>(
    comm: &C,
    len: usize,
    seed: u64,
    root: usize,
) -> Result<Round<E>, CommError> {
    let (rank, p) = (comm.rank(), comm.size());
    let gathered = comm.all_gather(input::<E>(seed, rank, len));
    let scattered: Vec<Work<Vec<E>>> = OPS
        .iter()
        .map(|&op| comm.reduce_scatter(input::<E>(seed + 1, rank, len * p), op))
        .collect();
    let reduced: Vec<Work<Vec<E>>> = OPS
        .iter()
        .map(|&op| comm.all_reduce(input::<E>(seed + 2, rank, len), op))
        .collect();
    let mine = if rank == root {
        input::<E>(seed + 3, rank, len)
    } else {
        vec![E::from_f32(0.0); len]
    };
    let broadcast = comm.broadcast(mine, root);
    let broadcast = broadcast.wait()?;
    let mut reduced_out = Vec::new();
    for w in reduced.into_iter().rev() {
        reduced_out.push(w.wait()?);
    }
    reduced_out.reverse();
    let mut scattered_out = Vec::new();
    for w in scattered.into_iter().rev() {
        scattered_out.push(w.wait()?);
    }
    scattered_out.reverse();
    Ok(Round {
        gathered: gathered.wait()?,
        scattered: scattered_out,
        reduced: reduced_out,
        broadcast,
    })
}

pub fn check<E: Element>(world: &Arc<MpiComm>, c: &mut Checks, len: usize) {
    let (rank, p) = (world.rank(), world.size());
    let seed = 1000 * len as u64 + E::DTYPE.size() as u64 + E::DTYPE.to_string().len() as u64;
    let root = len % p;
    let name = |what: &str| format!("{} len {len}: {what}", E::DTYPE);
    let got = round::<E, _>(world.as_ref(), len, seed, root);
    let threads = ThreadsEngine::new(p)
        .ranks_per_node(
            world
                .nodes()
                .iter()
                .filter(|&&n| n == world.nodes()[0])
                .count(),
        )
        .run(|comm| round::<E, _>(&comm, len, seed, root))
        .ok()
        .and_then(|mut all| all.swap_remove(rank).ok())
        .and_then(Result::ok);
    let got = match got {
        Ok(got) => got,
        Err(err) => {
            c.check(name("a round of collectives"), false, || format!("{err}"));
            return;
        }
    };
    let Some(threads) = threads else {
        c.check(name("threads engine round"), false, || "failed".into());
        return;
    };

    let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed, r, len)).collect();
    let want: Vec<E> = all.concat();
    c.check(
        name("all_gather == reference == threads engine"),
        same_bits(&got.gathered, &want) && same_bits(&got.gathered, &threads.gathered),
        || describe(&Ok(got.gathered.clone()), &want),
    );
    let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed + 1, r, len * p)).collect();
    for (i, op) in OPS.iter().enumerate() {
        let want = reference(&all, *op)[rank * len..(rank + 1) * len].to_vec();
        c.check(
            name(&format!(
                "reduce_scatter {op:?} == reference == threads engine"
            )),
            same_bits(&got.scattered[i], &want)
                && same_bits(&got.scattered[i], &threads.scattered[i]),
            || describe(&Ok(got.scattered[i].clone()), &want),
        );
    }
    let all: Vec<Vec<E>> = (0..p).map(|r| input::<E>(seed + 2, r, len)).collect();
    for (i, op) in OPS.iter().enumerate() {
        let want = reference(&all, *op);
        c.check(
            name(&format!("all_reduce {op:?} == reference == threads engine")),
            same_bits(&got.reduced[i], &want) && same_bits(&got.reduced[i], &threads.reduced[i]),
            || describe(&Ok(got.reduced[i].clone()), &want),
        );
    }
    let want = input::<E>(seed + 3, root, len);
    c.check(
        name(&format!("broadcast from {root} == root's input")),
        same_bits(&got.broadcast, &want) && same_bits(&got.broadcast, &threads.broadcast),
        || describe(&Ok(got.broadcast.clone()), &want),
    );
}
