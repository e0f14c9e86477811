//! `mics plan`: predicts memory per GPU and step time of DDP, ZeRO-2, ZeRO-3
//! and MiCS for a model on a cluster, and recommends a partition size.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};

use super::calibrate;
use mics_planner::{
    ClusterSpec, JsonPlan, ModelSpec, Planner, StrategyChoice, TrainConfig, plot_sweep,
    render_table, sweep,
};

/// Arguments of `mics plan`.
#[derive(clap::Args)]
pub struct Args {
    /// Model preset (gpt2-124m, gpt2-350m, gpt2-1.5b, bert-base, bert-large,
    /// bert-10b, bert-20b, gpt-100b, gpt-175b) or a Hugging Face config.json.
    #[arg(long, required_unless_present = "calibrate")]
    model: Option<String>,
    /// World size N (not needed with --sweep-gpus).
    #[arg(long)]
    gpus: Option<u64>,
    /// GPUs per node k [default: the cluster's].
    #[arg(long)]
    gpus_per_node: Option<u64>,
    /// Cluster preset: p3dn, p4d, p4de or h100.
    #[arg(long, default_value = "p4d")]
    cluster: String,
    /// Sequence length [default: the model's].
    #[arg(long)]
    seq: Option<u64>,
    /// Micro-batch per GPU.
    #[arg(long, default_value_t = 1)]
    micro_batch: u64,
    /// Micro-steps per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: u64,
    /// Strategies to predict: all, ddp, zero2, zero3 or mics.
    #[arg(long, default_value = "all")]
    strategy: String,
    /// Only this MiCS partition size (for a plan) or the one the sweep keeps.
    #[arg(long)]
    partition_size: Option<u64>,
    /// Keep all activations instead of recomputing each layer in backward.
    #[arg(long)]
    no_checkpointing: bool,
    /// Parameter units gathered ahead of use (0: no overlap of gathers).
    #[arg(long, default_value_t = 1)]
    prefetch_depth: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Weak scaling over these world sizes, e.g. 16,32,64,128,256,512.
    #[arg(long, value_delimiter = ',')]
    sweep_gpus: Option<Vec<u64>>,
    /// Draw the sweep (throughput per GPU and efficiency vs GPUs) to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Calibrate the time model on this machine: measure the in-process
    /// engine's collectives and NdArray's throughput, predict the step time of
    /// small real MiCS trainings, run them and compare (other flags but
    /// --json are ignored). Build with --release.
    #[arg(long)]
    calibrate: bool,
}

/// Runs `mics plan`.
pub fn run(args: Args) -> anyhow::Result<()> {
    emit(&output(args)?)
}

/// What `mics plan` prints (and the plot it draws), or the error.
fn output(args: Args) -> anyhow::Result<String> {
    if args.calibrate {
        let report = calibrate::calibrate(&calibrate::Setup::standard())?;
        return Ok(if args.json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&calibrate::to_json(&report))?
            )
        } else {
            calibrate::render(&report)
        });
    }
    let Some(model) = &args.model else {
        bail!("give --model NAME (or --calibrate)");
    };
    let model = ModelSpec::resolve(model)?;
    let cluster = ClusterSpec::preset(&args.cluster)?;
    let choice: StrategyChoice = args.strategy.parse()?;
    let config = TrainConfig {
        gpus: args.gpus.unwrap_or(0),
        gpus_per_node: args.gpus_per_node.unwrap_or(cluster.gpus_per_node),
        seq: args.seq.unwrap_or(model.default_seq),
        micro_batch: args.micro_batch,
        grad_accum: args.grad_accum,
        checkpointing: !args.no_checkpointing,
        prefetch_depth: args.prefetch_depth,
    };

    if let Some(sizes) = &args.sweep_gpus {
        if args.gpus.is_some() {
            bail!("give either --gpus or --sweep-gpus, not both");
        }
        let mut points = sweep(&model, &cluster, &config, sizes, args.partition_size)?;
        if choice != StrategyChoice::All {
            points.retain(|p| p.strategy == args.strategy);
        }
        if let Some(path) = &args.plot {
            let title = format!(
                "{} on {} (seq {}, micro-batch {}, grad-accum {}; only sizes that fit in memory)",
                model.name, cluster.name, config.seq, config.micro_batch, config.grad_accum
            );
            plot_sweep(&points, &title, path)?;
        }
        let mut out = String::new();
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&points)?)?;
        } else {
            writeln!(
                out,
                "{:<8}{:>7}{:>6}{:>6}{:>12}{:>12}",
                "strategy", "GPUs", "p", "fits", "TFLOPS/GPU", "efficiency"
            )?;
            for p in &points {
                let efficiency = p
                    .efficiency
                    .map_or_else(|| "-".to_string(), |e| format!("{:.3}", e));
                writeln!(
                    out,
                    "{:<8}{:>7}{:>6}{:>6}{:>12.1}{:>12}",
                    p.strategy,
                    p.gpus,
                    p.partition_size,
                    if p.fits { "yes" } else { "no" },
                    p.tflops_per_gpu,
                    efficiency
                )?;
            }
            if let Some(path) = &args.plot {
                writeln!(out, "plot written to {}", path.display())?;
            }
        }
        return Ok(out);
    }
    if args.plot.is_some() {
        bail!("--plot draws a weak-scaling sweep: give --sweep-gpus too");
    }
    if args.gpus.is_none() {
        bail!("give --gpus N (or --sweep-gpus N1,N2,...)");
    }

    let planner = Planner::new(model, cluster, config)?;
    let mut plan = planner.plan(choice)?;
    if let Some(p) = args.partition_size {
        if !planner.valid_partition_sizes().contains(&p) {
            bail!(
                "partition size {p} must divide {} GPUs and divide or be a multiple of {} GPUs per node",
                planner.config().gpus,
                planner.config().gpus_per_node
            );
        }
        plan.rows.retain(|r| {
            !matches!(r.strategy, mics_planner::Strategy::Mics { .. }) || r.partition_size == p
        });
    }
    let out = if args.json {
        let json = serde_json::to_string_pretty(&JsonPlan::from(&plan))
            .context("cannot encode the plan as JSON")?;
        format!("{json}\n")
    } else {
        render_table(&planner, &plan)
    };
    Ok(out)
}

/// Writes to stdout; a closed pipe (`mics plan ... | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn run_with(argv: &[&str]) -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("plan").chain(argv.iter().copied()))?;
        output(cli.args).map(drop)
    }

    fn one_line_error(argv: &[&str]) -> String {
        let message = format!("{:#}", run_with(argv).unwrap_err());
        assert!(!message.contains('\n'), "{message}");
        message
    }

    #[test]
    fn bad_inputs_fail_with_one_line_naming_the_problem() {
        let e = one_line_error(&["--model", "gpt-7", "--gpus", "8"]);
        assert!(e.starts_with("unknown model `gpt-7`"), "{e}");
        let e = one_line_error(&["--model", "gpt2-124m", "--gpus", "8", "--cluster", "tpu"]);
        assert!(e.starts_with("unknown cluster `tpu`"), "{e}");
        let e = one_line_error(&["--model", "gpt2-124m", "--gpus", "12"]);
        assert!(
            e.contains("12 GPUs is not a whole number of nodes of 8"),
            "{e}"
        );
        let e = one_line_error(&["--model", "gpt2-124m", "--gpus", "8", "--strategy", "zero4"]);
        assert!(e.starts_with("unknown strategy `zero4`"), "{e}");
        let dir = std::env::temp_dir().join(format!("mics-plan-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.json");
        std::fs::write(&config, "{\"n_embd\": 768,,}").unwrap();
        let e = one_line_error(&["--model", config.to_str().unwrap(), "--gpus", "8"]);
        assert!(e.starts_with("malformed model config"), "{e}");
        let e = one_line_error(&["--model", "bert-base", "--gpus", "8", "--plot", "x.png"]);
        assert!(e.contains("--sweep-gpus"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_preset_plans_and_a_sweep_draws_a_png() {
        for model in mics_planner::MODEL_PRESETS {
            for cluster in mics_planner::CLUSTER_PRESETS {
                let argv = [
                    "--model",
                    model,
                    "--gpus",
                    "64",
                    "--cluster",
                    cluster,
                    "--json",
                ];
                run_with(&argv).unwrap();
            }
        }
        let dir = std::env::temp_dir().join(format!("mics-plan-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("sweep.png");
        let argv = [
            "--model",
            "gpt-100b",
            "--micro-batch",
            "2",
            "--sweep-gpus",
            "128,256,512",
            "--plot",
            png.to_str().unwrap(),
        ];
        run_with(&argv).unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
