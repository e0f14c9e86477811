//! The checks of the suite: inputs exact in every type, the bit-exact
//! comparison, every collective on one communicator, splits, a mismatch, and
//! running a world of ranks on GPU 0 with the checks merged over its ranks.

use std::time::{Duration, Instant};

use super::Check;
use crate::nccl::{NcclComm, NcclEngine};
use crate::{
    Buffer, CollectiveKind, CommError, Communicator, DType, ReduceOp, Work, concat, reduce_range,
};

// The checks

/// Input of `rank`: small multiples of 1/4, exact in bf16 and f16, so sums
/// and means of one or two ranks are exact in every engine.
pub(super) fn input(dtype: DType, rank: usize, len: usize, salt: usize) -> Buffer {
    let values: Vec<f32> = (0..len)
        .map(|i| ((rank * 7 + i * 3 + salt * 5) % 13) as f32 - 6.0 + 0.25 * rank as f32)
        .collect();
    match dtype {
        DType::F32 => Buffer::F32(values),
        DType::Bf16 => Buffer::Bf16(values.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => Buffer::F16(values.into_iter().map(half::f16::from_f32).collect()),
    }
}

pub(super) fn floats(buffer: &Buffer) -> Vec<f32> {
    match buffer {
        Buffer::F32(v) => v.clone(),
        Buffer::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Buffer::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
    }
}

/// Same type, length and bits; the error names the first difference.
pub(super) fn compare(got: &Buffer, want: &Buffer) -> Result<(), String> {
    if got.dtype() != want.dtype() || got.len() != want.len() {
        return Err(format!(
            "got {} {} elements, want {} {}",
            got.len(),
            got.dtype(),
            want.len(),
            want.dtype()
        ));
    }
    if got == want {
        return Ok(());
    }
    let (g, w) = (floats(got), floats(want));
    let i = (0..g.len()).find(|&i| g[i] != w[i]).unwrap_or(0);
    Err(format!("element {i}: got {} want {}", g[i], w[i]))
}

pub(super) fn outcome(work: Work, want: &Buffer) -> Result<(), String> {
    match work.wait() {
        Ok(got) => compare(&got, want),
        Err(e) => Err(e.to_string()),
    }
}

/// The lengths checked for a type: odd ones, and one past a power of two.
pub(super) fn lengths(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::F32 => &[1, 7, 1000, 1001, (1 << 20) + 3],
        DType::Bf16 | DType::F16 => &[1, 7, 1001, (1 << 20) + 3],
    }
}

/// Every collective on `comm`, checked against the reference built from
/// every rank's inputs.
pub(super) fn collectives(comm: &NcclComm) -> Vec<Check> {
    let (rank, p) = (comm.rank(), comm.size());
    let mut checks = Vec::new();
    let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
    for dtype in [DType::F32, DType::Bf16, DType::F16] {
        for &len in lengths(dtype) {
            let all: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len, 0)).collect();
            let refs: Vec<&Buffer> = all.iter().collect();
            let name = |what: &str| format!("{p}rank/{what}/{dtype}/{len}");

            let work = comm.all_gather_buffer(all[rank].clone());
            checks.push(Check::new(
                name("all_gather"),
                outcome(work, &concat(&refs)),
            ));

            for op in ops {
                let want = reduce_range(&refs, 0..len, op);
                let work = comm.all_reduce_buffer(all[rank].clone(), op);
                checks.push(Check::new(
                    name(&format!("all_reduce_{op:?}")),
                    outcome(work, &want),
                ));
            }

            // Reduce-scatter needs a multiple of p: use len·p elements.
            let long: Vec<Buffer> = (0..p).map(|r| input(dtype, r, len * p, 1)).collect();
            let long_refs: Vec<&Buffer> = long.iter().collect();
            for op in ops {
                let want = reduce_range(&long_refs, rank * len..(rank + 1) * len, op);
                let work = comm.reduce_scatter_buffer(long[rank].clone(), op);
                checks.push(Check::new(
                    name(&format!("reduce_scatter_{op:?}")),
                    outcome(work, &want),
                ));
            }

            for root in [0, p - 1] {
                let work = comm.broadcast_buffer(all[rank].clone(), root);
                checks.push(Check::new(
                    name(&format!("broadcast_root{root}")),
                    outcome(work, &all[root]),
                ));
            }
        }
    }

    // Empty buffers.
    let empty = Buffer::F32(Vec::new());
    let work = comm.all_gather_buffer(empty.clone());
    checks.push(Check::new(
        format!("{p}rank/all_gather_empty"),
        outcome(work, &empty),
    ));

    // Deferred all-gather of an all-reduce, issued before either runs.
    let all: Vec<Buffer> = (0..p).map(|r| input(DType::F32, r, 5, 2)).collect();
    let refs: Vec<&Buffer> = all.iter().collect();
    let reduced = reduce_range(&refs, 0..5, ReduceOp::Sum);
    let first = comm.all_reduce_buffer(all[rank].clone(), ReduceOp::Sum);
    let chained = comm.all_gather_deferred(first);
    let want = concat(&vec![&reduced; p]);
    checks.push(Check::new(
        format!("{p}rank/all_gather_deferred"),
        outcome(chained, &want),
    ));

    checks.push(Check::new(
        format!("{p}rank/barrier"),
        comm.barrier().wait().map_err(|e| e.to_string()),
    ));

    // Byte counters: one all-gather of 4 KiB more must add (p-1)·4 KiB.
    let before = comm.stats();
    let gathered = comm.all_gather_buffer(Buffer::F32(vec![1.0; 1024])).wait();
    let after = comm.stats();
    let added = after.intra_node_bytes() + after.inter_node_bytes()
        - before.intra_node_bytes()
        - before.inter_node_bytes();
    let calls = after.calls(CollectiveKind::AllGather) - before.calls(CollectiveKind::AllGather);
    checks.push(Check::new(
        format!("{p}rank/stats"),
        match gathered {
            Err(e) => Err(e.to_string()),
            Ok(_) if calls == 1 && added == 4096 * (p as u64 - 1) => Ok(()),
            Ok(_) => Err(format!("{calls} calls, {added} bytes")),
        },
    ));

    checks.extend(splits(comm));
    checks
}

pub(super) fn splits(comm: &NcclComm) -> Vec<Check> {
    let (rank, p) = (comm.rank(), comm.size());
    // Everyone in one group, ranks reversed by key.
    let reversed = comm.split_nccl(0, p - rank).map_err(|e| e.to_string());
    let reversed = reversed.and_then(|sub| {
        if sub.rank() != p - 1 - rank || sub.size() != p {
            return Err(format!("new rank {} of {}", sub.rank(), sub.size()));
        }
        let mine = Buffer::F32(vec![sub.rank() as f32]);
        let want = Buffer::F32((0..p).map(|r| r as f32).collect());
        outcome(sub.all_gather_buffer(mine), &want)
    });
    // One group per rank.
    let single = comm.split_nccl(rank, 0).map_err(|e| e.to_string());
    let single = single.and_then(|sub| {
        if sub.size() != 1 || sub.world_ranks() != [rank] {
            return Err(format!("group {:?}", sub.world_ranks()));
        }
        let mine = input(DType::Bf16, rank, 9, 3);
        outcome(sub.all_reduce_buffer(mine.clone(), ReduceOp::Sum), &mine)
    });
    vec![
        Check::new(format!("{p}rank/split_reversed"), reversed),
        Check::new(format!("{p}rank/split_singletons"), single),
    ]
}

/// Two ranks: a length mismatch is an error on both, and the next
/// collective still works.
pub(super) fn mismatch(comm: &NcclComm) -> Vec<Check> {
    let len = 3 + comm.rank();
    let got = comm.all_gather_buffer(Buffer::F32(vec![1.0; len])).wait();
    let first = match got {
        Err(CommError::Mismatch { .. }) => Ok(()),
        other => Err(format!("expected a mismatch error, got {other:?}")),
    };
    let want = Buffer::F32(vec![comm.size() as f32; 4]);
    let after = outcome(
        comm.all_reduce_buffer(Buffer::F32(vec![1.0; 4]), ReduceOp::Sum),
        &want,
    );
    vec![
        Check::new("2rank/mismatch_is_an_error", first),
        Check::new("2rank/works_after_mismatch", after),
    ]
}

/// Merges the ranks' checks: a check passes if it passed on every rank.
pub(super) fn merge(per_rank: Vec<Result<Vec<Check>, String>>) -> Vec<Check> {
    let mut merged: Vec<Check> = Vec::new();
    for (rank, result) in per_rank.into_iter().enumerate() {
        let checks = match result {
            Ok(checks) => checks,
            Err(panic) => vec![Check::new(format!("rank{rank}_panicked"), Err(panic))],
        };
        for check in checks {
            let result = check.result.map_err(|e| format!("rank {rank}: {e}"));
            match merged.iter_mut().find(|c| c.name == check.name) {
                Some(slot) => {
                    if slot.result.is_ok() {
                        slot.result = result;
                    }
                }
                None => merged.push(Check::new(check.name, result)),
            }
        }
    }
    merged
}

pub(super) fn run_world(
    devices: &[usize],
    f: impl Fn(NcclComm) -> Vec<Check> + Sync,
) -> Vec<Check> {
    let engine = NcclEngine::new().timeout(Duration::from_secs(60));
    match engine.run(devices, f) {
        Ok(per_rank) => merge(per_rank),
        Err(e) => vec![Check::new(
            format!("{}rank/init", devices.len()),
            Err(e.to_string()),
        )],
    }
}

/// Mean time of a 16 MiB f32 all-gather per rank (after one warm-up), for
/// information only.
pub(super) fn all_gather_ms(devices: &[usize]) -> Option<f64> {
    let engine = NcclEngine::new().timeout(Duration::from_secs(60));
    let per_rank = engine
        .run(devices, |comm| {
            let x = Buffer::F32(vec![1.0; 4 << 20]);
            comm.all_gather_buffer(x.clone()).wait().ok()?;
            let t = Instant::now();
            for _ in 0..5 {
                comm.all_gather_buffer(x.clone()).wait().ok()?;
            }
            Some(t.elapsed().as_secs_f64() / 5.0 * 1e3)
        })
        .ok()?;
    per_rank.into_iter().next()?.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_passes_only_if_it_passed_on_every_rank() {
        let merged = merge(vec![
            Ok(vec![
                Check::new("a", Ok(())),
                Check::new("b", Err("off".into())),
            ]),
            Ok(vec![
                Check::new("a", Err("bits".into())),
                Check::new("b", Ok(())),
            ]),
            Err("boom".into()),
        ]);
        assert_eq!(
            merged,
            [
                Check::new("a", Err("rank 1: bits".into())),
                Check::new("b", Err("rank 0: off".into())),
                Check::new("rank2_panicked", Err("rank 2: boom".into())),
            ]
        );
    }

    #[test]
    fn comparisons_are_bit_exact_and_name_the_first_difference() {
        let a = input(DType::Bf16, 1, 9, 0);
        assert_eq!(compare(&a, &a.clone()), Ok(()));
        let mut b = floats(&a);
        b[4] += 0.25;
        let b = Buffer::Bf16(b.into_iter().map(half::bf16::from_f32).collect());
        let err = compare(&b, &a).unwrap_err();
        assert!(err.starts_with("element 4: "), "{err}");
        let err = compare(&Buffer::F32(vec![0.0; 2]), &a).unwrap_err();
        assert_eq!(err, "got 2 f32 elements, want 9 bf16");
    }
}
