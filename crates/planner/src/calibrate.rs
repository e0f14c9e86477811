//! A measured machine as the planner sees it: the alpha-beta fit of timed
//! collectives, and the cluster description of one node whose "GPUs" are
//! rank threads sharing the machine. `mics plan --calibrate` measures (the
//! probes, the throughput under sharing) and compares the planner's
//! predictions with real runs; this is the maths in between.

use serde::Serialize;

use crate::cluster::ClusterSpec;
use crate::collective::Collective;

/// One timed collective.
#[derive(Debug, Clone, Serialize)]
pub struct CollectiveProbe {
    /// Which collective (`all_gather`, `reduce_scatter` or `all_reduce` in
    /// JSON).
    pub kind: Collective,
    /// Ranks in the group.
    pub ranks: usize,
    /// Full message (gathered or reduced) bytes.
    pub message_bytes: f64,
    /// Median seconds.
    pub time_s: f64,
}

/// The alpha-beta fit of the probes, in the planner's ring form
/// `t = base + steps·hop + factor·M / B`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CommFit {
    /// Fixed cost per collective, µs.
    pub base_latency_us: f64,
    /// Cost per ring step, µs.
    pub hop_latency_us: f64,
    /// Bandwidth per rank, GB/s (infinite when the fit finds no
    /// bandwidth term).
    pub bandwidth_gbps: f64,
}

/// Throughput of one rank while `ranks` threads work at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedThroughput {
    /// Threads working at once.
    pub ranks: usize,
    /// Matmul GFLOP/s of one of them, at the model's shapes.
    pub matmul_gflops: f64,
    /// Element-wise GB/s (bytes read + written) of one of them.
    pub elementwise_gbps: f64,
    /// Median step time of a plain (unsharded, uncommunicating) training
    /// step of the calibration model, one per thread, all threads at once, s.
    pub plain_step_s: f64,
    /// FLOPs of that step at the matmul rate / its measured time: the
    /// fraction of the matmul rate a whole training step reaches.
    pub compute_efficiency: f64,
}

/// Least squares of `t = base + steps·hop + factor·M·(1/B)` over the probes
/// (ring steps `n-1`, `2(n-1)` for all-reduce; `factor = steps/n`), every
/// coefficient kept non-negative: a negative one is dropped and the rest
/// refitted.
pub fn fit_collectives(probes: &[CollectiveProbe]) -> CommFit {
    let rows: Vec<([f64; 3], f64)> = probes
        .iter()
        .map(|p| {
            let n = p.ranks as f64;
            let steps = if p.kind == Collective::AllReduce {
                2.0 * (n - 1.0)
            } else {
                n - 1.0
            };
            ([1.0, steps, steps / n * p.message_bytes], p.time_s)
        })
        .collect();
    let mut active = [true; 3];
    let mut coef = [0.0; 3];
    for _ in 0..3 {
        coef = least_squares(&rows, &active);
        match (0..3).find(|&i| active[i] && coef[i] < 0.0) {
            Some(i) => active[i] = false,
            None => break,
        }
    }
    CommFit {
        base_latency_us: coef[0].max(0.0) * 1e6,
        hop_latency_us: coef[1].max(0.0) * 1e6,
        bandwidth_gbps: if coef[2] > 0.0 {
            1.0 / coef[2] / 1e9
        } else {
            f64::INFINITY
        },
    }
}

/// Weighted least squares `y ≈ Σ c_i·x_i` on the `active` columns, each row
/// weighted by `1/y²` (relative errors, so that small messages count as much
/// as large ones), by Gaussian elimination on the normal equations. Inactive
/// columns get 0, and so does a column whose pivot vanishes (a singular
/// system).
pub(crate) fn least_squares(rows: &[([f64; 3], f64)], active: &[bool; 3]) -> [f64; 3] {
    let cols: Vec<usize> = (0..3).filter(|&i| active[i]).collect();
    let m = cols.len();
    let mut a = vec![vec![0.0; m + 1]; m];
    for (x, y) in rows {
        let w = 1.0 / (y * y).max(1e-18);
        for (i, &ci) in cols.iter().enumerate() {
            for (j, &cj) in cols.iter().enumerate() {
                a[i][j] += w * x[ci] * x[cj];
            }
            a[i][m] += w * x[ci] * y;
        }
    }
    for i in 0..m {
        let pivot = (i..m)
            .max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))
            .unwrap_or(i);
        a.swap(i, pivot);
        let d = a[i][i];
        if d.abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[i].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != i {
                let f = row[i] / d;
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(i) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = [0.0; 3];
    for (i, &ci) in cols.iter().enumerate() {
        out[ci] = if a[i][i].abs() < 1e-300 {
            0.0
        } else {
            a[i][m] / a[i][i]
        };
    }
    out
}

/// The machine as a planner cluster for a configuration of `shared.ranks`
/// rank threads: one node of k = N, each "GPU" with the matmul rate and the
/// memory bandwidth one thread gets while N work at once, and the engine's
/// fitted collective costs. The bandwidth efficiency is 1 (the fit is what
/// the engine reaches); the compute efficiency is 1 (the matmul rate alone)
/// or, with `step_efficiency`, the fraction of it a plain unsharded step
/// reaches at the same N ([`SharedThroughput::compute_efficiency`]).
pub fn machine_cluster(
    shared: &SharedThroughput,
    fit: &CommFit,
    step_efficiency: bool,
) -> ClusterSpec {
    ClusterSpec {
        name: format!("this-machine-{}", shared.ranks),
        description: format!(
            "this machine, {} rank threads sharing its cores (measured)",
            shared.ranks
        ),
        gpus_per_node: shared.ranks as u64,
        gpu_memory_gib: 1024.0,
        peak_tflops: shared.matmul_gflops / 1e3,
        hbm_gbps: shared.elementwise_gbps,
        intra_node_gbps: fit.bandwidth_gbps,
        inter_node_gbit: fit.bandwidth_gbps * 8.0,
        intra_latency_us: fit.hop_latency_us,
        inter_latency_us: fit.hop_latency_us,
        base_latency_us: fit.base_latency_us,
        bandwidth_efficiency: 1.0,
        compute_efficiency: if step_efficiency {
            shared.compute_efficiency
        } else {
            1.0
        },
        reserved_gib: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn least_squares_solves_an_exact_system() {
        // y = 2 + 3·s + 5·m, three rows: c = (2, 3, 5), whatever the weights.
        let rows = [
            ([1.0, 0.0, 0.0], 2.0),
            ([1.0, 1.0, 0.0], 5.0),
            ([1.0, 0.0, 1.0], 7.0),
        ];
        let c = least_squares(&rows, &[true; 3]);
        assert!(
            close(c[0], 2.0) && close(c[1], 3.0) && close(c[2], 5.0),
            "{c:?}"
        );
    }

    #[test]
    fn least_squares_weights_rows_by_one_over_y_squared() {
        // One active column, rows (x, y) = (1, 1) and (2, 4): weights 1 and
        // 1/16, so c = Σ w·x·y / Σ w·x² = (1 + 8/16) / (1 + 4/16) = 1.2
        // (unweighted it would be 9/5 = 1.8). Inactive columns are 0.
        let rows = [([1.0, 7.0, 7.0], 1.0), ([2.0, 7.0, 7.0], 4.0)];
        let c = least_squares(&rows, &[true, false, false]);
        assert!(close(c[0], 1.2), "{c:?}");
        assert_eq!(c[1..], [0.0, 0.0]);
    }

    fn probe(kind: Collective, ranks: usize, message_bytes: f64, time_s: f64) -> CollectiveProbe {
        CollectiveProbe {
            kind,
            ranks,
            message_bytes,
            time_s,
        }
    }

    #[test]
    fn the_fit_recovers_an_alpha_beta_law() {
        let probes: Vec<CollectiveProbe> = [2usize, 4]
            .iter()
            .flat_map(|&n| {
                [1e3, 1e5, 1e7].into_iter().map(move |m| {
                    let steps = (n - 1) as f64;
                    let t = 20e-6 + steps * 5e-6 + steps / n as f64 * m / 2e9;
                    probe(Collective::AllGather, n, m, t)
                })
            })
            .collect();
        let fit = fit_collectives(&probes);
        assert!((fit.base_latency_us - 20.0).abs() < 0.1, "{fit:?}");
        assert!((fit.hop_latency_us - 5.0).abs() < 0.1, "{fit:?}");
        assert!((fit.bandwidth_gbps - 2.0).abs() < 0.01, "{fit:?}");
    }

    #[test]
    fn a_negative_coefficient_is_dropped_and_the_rest_refitted() {
        // Time falls with the ring steps at a fixed message: the hop term
        // would be negative, so the fit keeps only base and bandwidth. With
        // 2 and 3 ranks (1 and 2 steps; factor ½·M and ⅔·M) the exact
        // rows t = 10 µs + factor·M / (1 GB/s) minus a step term leave the
        // hop at 0 and both others positive.
        let m = 1e6;
        let probes = [
            probe(Collective::AllGather, 2, m, 10e-6 + 0.5 * m / 1e9),
            probe(
                Collective::AllGather,
                3,
                m,
                10e-6 + 2.0 / 3.0 * m / 1e9 - 100e-6,
            ),
            probe(
                Collective::AllReduce,
                2,
                m,
                10e-6 + 2.0 * 0.5 * m / 1e9 - 100e-6,
            ),
        ];
        let fit = fit_collectives(&probes);
        assert_eq!(fit.hop_latency_us, 0.0, "{fit:?}");
        assert!(
            fit.base_latency_us >= 0.0 && fit.bandwidth_gbps > 0.0,
            "{fit:?}"
        );
        assert!(fit.bandwidth_gbps.is_finite(), "{fit:?}");
    }

    #[test]
    fn probes_serialise_with_snake_case_kinds() {
        let json = serde_json::to_value(probe(Collective::ReduceScatter, 2, 8.0, 1e-3)).unwrap();
        assert_eq!(json["kind"], "reduce_scatter");
        assert_eq!(json["ranks"], 2);
    }

    #[test]
    fn the_machine_is_one_node_of_its_rank_threads() {
        let shared = SharedThroughput {
            ranks: 4,
            matmul_gflops: 50.0,
            elementwise_gbps: 3.0,
            plain_step_s: 0.2,
            compute_efficiency: 0.4,
        };
        let fit = CommFit {
            base_latency_us: 30.0,
            hop_latency_us: 7.0,
            bandwidth_gbps: 2.5,
        };
        let raw = machine_cluster(&shared, &fit, false);
        assert_eq!(raw.gpus_per_node, 4);
        assert_eq!(raw.peak_tflops, 0.05);
        assert_eq!(raw.hbm_gbps, 3.0);
        assert_eq!(raw.intra_node_gbps, 2.5);
        assert_eq!(raw.inter_node_gbit, 20.0);
        assert_eq!((raw.intra_latency_us, raw.inter_latency_us), (7.0, 7.0));
        assert_eq!(raw.base_latency_us, 30.0);
        assert_eq!(raw.compute_efficiency, 1.0);
        assert_eq!(machine_cluster(&shared, &fit, true).compute_efficiency, 0.4);
    }
}
