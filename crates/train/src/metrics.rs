//! Rank 0's outputs: the metrics file (JSON lines), the loss-curve PNG and
//! the progress display.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// One line of the metrics file: a training step, or an evaluation (then
/// only `step` and `val_loss` are set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StepMetrics {
    /// Optimizer steps done (1 after the first).
    pub step: u64,
    /// Mean training loss over the global batch of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate used by this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Tokens trained on so far, over all ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Training throughput of this step, over all ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Mean validation loss (evaluation lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Reads a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| TrainError::io(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Appends metric lines, flushed after each so a killed run keeps them.
pub(crate) struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Opens the file for a run starting at `start_step`: a fresh run
    /// truncates it, a resumed one keeps the lines up to `start_step` (a run
    /// killed after its last checkpoint wrote lines that will be redone).
    pub(crate) fn open(path: &Path, start_step: u64) -> Result<MetricsWriter, TrainError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        // Kept verbatim: re-serialising parsed floats could change their last digit.
        let mut text = String::new();
        if start_step > 0 && path.exists() {
            let old = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
            for (i, line) in old
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let m: StepMetrics = serde_json::from_str(line)
                    .map_err(|e| TrainError::io(path, format!("line {}: {e}", i + 1)))?;
                if m.step <= start_step {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        mics_hub::checkpoint::write_atomic(path, text.as_bytes())
            .map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub(crate) fn write(&mut self, metrics: &StepMetrics) -> Result<(), TrainError> {
        crate::fault::metrics_write(&self.path, metrics.step)?;
        let mut line = serde_json::to_string(metrics).expect("plain struct");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

use mics_planner::PLOT_FONT as FONT;

/// Draws training loss (and validation loss where evaluated) against steps.
pub(crate) fn plot_loss(
    metrics: &[StepMetrics],
    title: &str,
    path: &Path,
) -> Result<(), TrainError> {
    let fail = |e: &dyn std::fmt::Display| TrainError::io(path, format!("plot: {e}"));
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| fail(&"the embedded font is invalid"))?;
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m.step as f64, m.loss?)))
        .collect();
    let val: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m.step as f64, m.val_loss?)))
        .collect();
    if train.is_empty() {
        return Err(fail(&"no training step to draw"));
    }
    let all = train.iter().chain(&val);
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("cross-entropy (nats)")
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
        .map_err(|e| fail(&e))?
        .label("training loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// What rank 0 shows while training: a progress bar on a terminal, log
/// lines every `log_every` steps otherwise.
pub(crate) enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { every: u64, total: u64 },
}

impl Progress {
    pub(crate) fn new(start: u64, total: u64, log_every: u64) -> Progress {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total).with_position(start);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template"),
            );
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                every: log_every.max(1),
                total,
            }
        }
    }

    pub(crate) fn step(&self, m: &StepMetrics, eta_s: f64) {
        let msg = format!(
            "loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s",
            m.loss.unwrap_or(f64::NAN),
            m.lr.unwrap_or(0.0),
            m.grad_norm.unwrap_or(f64::NAN),
            m.tokens_per_s.unwrap_or(0.0)
        );
        match self {
            Progress::Bar(bar) => {
                bar.set_message(msg);
                bar.set_position(m.step);
            }
            Progress::Lines { every, total } => {
                if m.step.is_multiple_of(*every) || m.step == *total {
                    eprintln!("step {}/{total} {msg} eta {:.0}s", m.step, eta_s);
                }
            }
        }
    }

    pub(crate) fn note(&self, line: &str) {
        match self {
            Progress::Bar(bar) => bar.println(line),
            Progress::Lines { .. } => eprintln!("{line}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}
