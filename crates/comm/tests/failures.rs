//! Failures are errors on every rank, never hangs or silent corruption.

use std::time::{Duration, Instant};

use half::bf16;
use mics_comm::{
    Collectives, CommError, Communicator, Fingerprint, MicsGroups, ReduceOp, ThreadsEngine,
    Topology,
};

#[test]
fn a_rank_that_panics_fails_its_peers_collectives_promptly() {
    let start = Instant::now();
    let results = ThreadsEngine::new(4)
        .timeout(Duration::from_secs(60))
        .run(|comm| {
            if comm.rank() == 2 {
                panic!("rank 2 crashed");
            }
            comm.all_gather(vec![1.0f32; 3]).wait()
        })
        .unwrap();
    // Well under the 60 s timeout: the peers learn of the panic directly.
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(results[2].as_ref().unwrap_err(), "rank 2 crashed");
    for r in [0, 1, 3] {
        let err = results[r].as_ref().unwrap().as_ref().unwrap_err();
        assert!(
            err.to_string()
                .contains("rank 2 left the group (its thread panicked)"),
            "{err}"
        );
    }
}

#[test]
fn a_rank_that_returns_early_fails_its_peers() {
    let results = ThreadsEngine::new(3)
        .timeout(Duration::from_secs(60))
        .run(|comm| {
            if comm.rank() == 0 {
                return Ok(vec![]);
            }
            comm.all_reduce(vec![1.0f32; 3], ReduceOp::Sum).wait()
        })
        .unwrap();
    for r in [1, 2] {
        let err = results[r].as_ref().unwrap().as_ref().unwrap_err();
        // The first rank to notice reports it; a rank arriving after that
        // finds the group poisoned by the same cause.
        assert!(
            err.to_string().contains("rank 0 left the group"),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_times_out_on_every_rank() {
    let results = ThreadsEngine::new(3)
        .timeout(Duration::from_millis(300))
        .run(|comm| {
            if comm.rank() == 1 {
                // Arrives long after the others gave up.
                std::thread::sleep(Duration::from_millis(900));
            }
            comm.barrier().wait()
        })
        .unwrap();
    for (r, result) in results.iter().enumerate() {
        let err = result.as_ref().unwrap().as_ref().unwrap_err();
        if r == 1 {
            // The late rank finds the group already failed.
            assert!(matches!(err, CommError::Poisoned(_)), "rank 1: {err}");
            assert!(err.to_string().contains("timed out"), "{err}");
        } else {
            match err {
                CommError::Timeout { missing, .. } => assert_eq!(missing, &vec![1]),
                other => panic!("rank {r}: expected a timeout, got {other}"),
            }
        }
    }
}

#[test]
fn giving_up_on_a_handle_fails_the_whole_group() {
    // Rank 0 waits with a short timeout while rank 1 is slow; rank 0's give-up
    // must fail rank 1's collective too (no half-completed state).
    let results = ThreadsEngine::new(2)
        .timeout(Duration::from_secs(60))
        .run(|comm| {
            if comm.rank() == 0 {
                comm.all_gather(vec![1.0f32])
                    .wait_timeout(Duration::from_millis(100))
            } else {
                std::thread::sleep(Duration::from_millis(500));
                comm.all_gather(vec![2.0f32]).wait()
            }
        })
        .unwrap();
    let e0 = results[0].as_ref().unwrap().as_ref().unwrap_err();
    assert!(e0.to_string().contains("did not complete within"), "{e0}");
    let e1 = results[1].as_ref().unwrap().as_ref().unwrap_err();
    assert!(
        matches!(e1, CommError::Poisoned(_) | CommError::Engine { .. }),
        "{e1}"
    );
}

#[test]
fn mismatched_lengths_are_an_error_on_every_rank() {
    let results = ThreadsEngine::new(3)
        .run(|comm| {
            let len = if comm.rank() == 2 { 5 } else { 4 };
            let first = comm.all_gather(vec![0.0f32; len]).wait();
            // The group stays usable after a mismatch that every rank saw.
            let second = comm.all_gather(vec![comm.rank() as f32]).wait();
            (first, second)
        })
        .unwrap();
    for result in results {
        let (first, second) = result.unwrap();
        match first.unwrap_err() {
            CommError::Mismatch {
                rank,
                expected,
                found,
                ..
            } => {
                assert_eq!(rank, 2);
                assert_eq!(expected, "all_gather of 4 f32 elements");
                assert_eq!(found, "all_gather of 5 f32 elements");
            }
            other => panic!("expected a mismatch, got {other}"),
        }
        assert_eq!(second.unwrap(), vec![0.0, 1.0, 2.0]);
    }
}

#[test]
fn mismatched_kinds_dtypes_and_ops_are_errors() {
    let results = ThreadsEngine::new(2)
        .run(|comm| {
            let r = comm.rank();
            let kinds = if r == 0 {
                comm.all_gather(vec![0.0f32; 2]).wait()
            } else {
                comm.all_reduce(vec![0.0f32; 2], ReduceOp::Sum).wait()
            };
            let dtypes = if r == 0 {
                comm.all_gather(vec![0.0f32; 2]).wait().map(|_| ())
            } else {
                comm.all_gather(vec![bf16::ZERO; 2]).wait().map(|_| ())
            };
            let op = if r == 0 { ReduceOp::Sum } else { ReduceOp::Max };
            let ops = comm.all_reduce(vec![0.0f32; 2], op).wait();
            let roots = comm.broadcast(vec![0.0f32; 2], r).wait();
            (kinds, dtypes, ops, roots)
        })
        .unwrap();
    for result in results {
        let (kinds, dtypes, ops, roots) = result.unwrap();
        for err in [
            kinds.unwrap_err(),
            dtypes.unwrap_err(),
            ops.unwrap_err(),
            roots.unwrap_err(),
        ] {
            assert!(matches!(err, CommError::Mismatch { rank: 1, .. }), "{err}");
        }
    }
}

/// Two packed buffers of the same total length whose pieces differ (the
/// same two parameters packed in another order on one rank) pass every
/// length check: only the fingerprint tells them apart.
#[test]
fn packed_buffers_with_other_pieces_are_a_mismatch_on_every_rank() {
    let results = ThreadsEngine::new(4)
        .run(|comm| {
            let r = comm.rank();
            // Pieces: (identity, length). Rank 3 packs b before a.
            let (a, b) = ([7u64, 3], [9u64, 3]);
            let tag = if r == 3 {
                Fingerprint::of_pieces([b, a])
            } else {
                Fingerprint::of_pieces([a, b])
            };
            let gather = comm.all_gather_with(vec![r as f32; 6], tag).wait();
            let reduce = comm
                .reduce_scatter_with(vec![1.0f32; 8], ReduceOp::Sum, tag)
                .wait();
            let all = comm
                .all_reduce_with(vec![1.0f32; 6], ReduceOp::Sum, tag)
                .wait();
            // An unfingerprinted collective does not match a fingerprinted one.
            let plain = if r == 0 {
                comm.all_gather(vec![0.0f32; 2]).wait()
            } else {
                comm.all_gather_with(vec![0.0f32; 2], tag).wait()
            };
            // Matching fingerprints go through, and the group is still usable.
            let same = comm
                .all_gather_with(vec![r as f32], Fingerprint::of_pieces([a]))
                .wait();
            (gather, reduce, all, plain, same)
        })
        .unwrap();
    for result in results {
        let (gather, reduce, all, plain, same) = result.unwrap();
        for err in [gather.unwrap_err(), reduce.unwrap_err(), all.unwrap_err()] {
            match err {
                CommError::Mismatch {
                    rank,
                    expected,
                    found,
                    ..
                } => {
                    assert_eq!(rank, 3);
                    assert!(expected.contains("with fingerprint"), "{expected}");
                    assert_ne!(expected, found);
                }
                other => panic!("expected a mismatch, got {other}"),
            }
        }
        assert!(
            matches!(plain, Err(CommError::Mismatch { rank: 1, .. })),
            "{plain:?}"
        );
        assert_eq!(same.unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    }
}

/// The hierarchical all-gather checks the fingerprint on both stages.
#[test]
fn hierarchical_gathers_check_fingerprints() {
    let topology = Topology::new(4, 2, 4).unwrap();
    let results = ThreadsEngine::new(4)
        .ranks_per_node(2)
        .run(|comm| {
            let r = comm.rank();
            let world: std::sync::Arc<dyn Communicator> = std::sync::Arc::new(comm);
            let groups = MicsGroups::new(world, topology).unwrap();
            assert!(topology.is_hierarchical());
            let tag = Fingerprint::of_pieces([[u64::from(r == 2), 2]]);
            groups
                .all_gather_partition_with(vec![r as f32; 2], tag)
                .wait()
        })
        .unwrap();
    for (r, result) in results.into_iter().enumerate() {
        let err = result.unwrap().unwrap_err();
        assert!(
            matches!(err, CommError::Mismatch { .. } | CommError::Poisoned(_)),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn a_reduce_scatter_not_divisible_by_the_group_is_rejected_on_every_rank() {
    let results = ThreadsEngine::new(4)
        .run(|comm| comm.reduce_scatter(vec![1.0f32; 10], ReduceOp::Sum).wait())
        .unwrap();
    for result in results {
        let err = result.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("multiple of the group size"),
            "{err}"
        );
    }
}

#[test]
fn a_bad_broadcast_root_is_rejected() {
    let results = ThreadsEngine::new(2)
        .run(|comm| comm.broadcast(vec![1.0f32], 5).wait())
        .unwrap();
    for result in results {
        let err = result.unwrap().unwrap_err();
        assert!(err.to_string().contains("root 5"), "{err}");
    }
}
