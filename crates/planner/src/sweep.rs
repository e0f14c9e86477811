//! Weak scaling: the same per-GPU work on more GPUs, and its plot.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::cluster::ClusterSpec;
use crate::error::PlanError;
use crate::model::ModelSpec;
use crate::plan::{Planner, Strategy, TrainConfig};

/// One strategy at one cluster size.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SweepPoint {
    /// World size.
    pub gpus: u64,
    /// `ddp`, `zero2`, `zero3` or `mics`.
    pub strategy: &'static str,
    /// Ranks sharing one replica.
    pub partition_size: u64,
    /// Whether it fits in memory.
    pub fits: bool,
    /// Executed TFLOPS per GPU.
    pub tflops_per_gpu: f64,
    /// Throughput per GPU relative to the smallest size where the strategy
    /// fits (weak-scaling efficiency); `None` where it does not fit.
    pub efficiency: Option<f64>,
}

/// Runs every strategy at every size in `gpus` with `config`'s per-GPU
/// micro-batch. MiCS keeps one partition size for the whole sweep:
/// `partition_size`, or else the smallest that fits at the smallest size.
pub fn sweep(
    model: &ModelSpec,
    cluster: &ClusterSpec,
    config: &TrainConfig,
    gpus: &[u64],
    partition_size: Option<u64>,
) -> Result<Vec<SweepPoint>, PlanError> {
    let mut sizes = gpus.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let Some(&smallest) = sizes.first() else {
        return Err(PlanError::InvalidConfig("--sweep-gpus is empty".into()));
    };
    let planner_at = |n: u64| {
        Planner::new(
            model.clone(),
            cluster.clone(),
            TrainConfig {
                gpus: n,
                ..config.clone()
            },
        )
    };
    let p = match partition_size {
        Some(p) => p,
        None => planner_at(smallest)?
            .plan(crate::plan::StrategyChoice::Mics)?
            .recommended_partition_size
            .ok_or_else(|| {
                PlanError::InvalidConfig(format!(
                    "no MiCS partition size fits {} on {smallest} GPUs; give --partition-size or more GPUs",
                    model.name
                ))
            })?,
    };
    if let Some(&n) = sizes.iter().find(|&&n| n % p != 0) {
        return Err(PlanError::InvalidConfig(format!(
            "partition size {p} does not divide {n} GPUs in --sweep-gpus"
        )));
    }
    let strategies = [
        Strategy::Ddp,
        Strategy::Zero2,
        Strategy::Zero3,
        Strategy::Mics { partition_size: p },
    ];
    let mut points = Vec::new();
    for strategy in strategies {
        let mut first: Option<f64> = None;
        for &n in &sizes {
            let e = planner_at(n)?.estimate(strategy)?;
            if e.fits && first.is_none() {
                first = Some(e.tflops_per_gpu);
            }
            points.push(SweepPoint {
                gpus: n,
                strategy: strategy.name(),
                partition_size: e.partition_size,
                fits: e.fits,
                tflops_per_gpu: e.tflops_per_gpu,
                efficiency: first.filter(|_| e.fits).map(|f| e.tflops_per_gpu / f),
            });
        }
    }
    Ok(points)
}

/// The font embedded for plots, DejaVu Sans (Bitstream Vera license, see
/// `assets/DejaVuSans.LICENSE`), so drawing needs no system fonts: register it
/// with `plotters::style::register_font("sans-serif", FontStyle::Normal,
/// PLOT_FONT)` (plotters' `ab_glyph` feature).
pub static PLOT_FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws throughput per GPU and weak-scaling efficiency against GPUs, one
/// line per strategy over the sizes where it fits, into a PNG file.
pub fn plot_sweep(points: &[SweepPoint], title: &str, path: &Path) -> Result<(), PlanError> {
    let fail = |e: &dyn std::fmt::Display| PlanError::Plot {
        path: path.to_path_buf(),
        problem: e.to_string(),
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, PLOT_FONT)
        .map_err(|_| fail(&"the embedded font is invalid"))?;
    let fitting: Vec<&SweepPoint> = points.iter().filter(|p| p.fits).collect();
    if fitting.is_empty() {
        return Err(fail(
            &"no strategy fits in memory at any size: nothing to draw",
        ));
    }
    let min_n = points.iter().map(|p| p.gpus).min().unwrap_or(1) as f64;
    let max_n = points.iter().map(|p| p.gpus).max().unwrap_or(1) as f64;
    let (x_lo, x_hi) = (min_n / 1.2, max_n * 1.2);
    let max_tflops = fitting.iter().map(|p| p.tflops_per_gpu).fold(0.0, f64::max) * 1.15;
    let max_eff = fitting
        .iter()
        .filter_map(|p| p.efficiency)
        .fold(1.0, f64::max)
        * 1.05;

    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| fail(&e))?;
    let panels = root.split_evenly((1, 2));
    let colors = [RED, BLUE, GREEN, MAGENTA];
    let names = ["ddp", "zero2", "zero3", "mics"];
    let label = |name: &str| -> String {
        let p = points
            .iter()
            .find(|pt| pt.strategy == name)
            .map(|pt| pt.partition_size)
            .unwrap_or(0);
        match name {
            "ddp" => "DDP".to_string(),
            "zero2" => "ZeRO-2".to_string(),
            "zero3" => "ZeRO-3".to_string(),
            _ => format!("MiCS (p = {p})"),
        }
    };

    for (panel, efficiency) in panels.iter().zip([false, true]) {
        let (y_hi, caption, y_desc) = if efficiency {
            (
                max_eff,
                "Weak-scaling efficiency",
                "throughput per GPU / smallest size",
            )
        } else {
            (max_tflops, "Throughput per GPU", "TFLOPS per GPU")
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((x_lo..x_hi).log_scale().base(2.0), 0.0..y_hi)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("GPUs")
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{:.0}", x))
            .light_line_style(RGBColor(238, 238, 238))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| fail(&e))?;
        for (name, color) in names.iter().zip(colors) {
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.strategy == *name && p.fits)
                .filter_map(|p| {
                    let y = if efficiency {
                        p.efficiency?
                    } else {
                        p.tflops_per_gpu
                    };
                    Some((p.gpus as f64, y))
                })
                .collect();
            if series.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(3)))
                .map_err(|e| fail(&e))?
                .label(label(name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(
                    series
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )
                .map_err(|e| fail(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}
