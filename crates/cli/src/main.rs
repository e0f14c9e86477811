//! `mics`: the command line of the mics framework.

use clap::{Parser, Subcommand};

mod commands;

// Training allocates and frees the same large buffers every step (the fused
// head's chunk of logits, the gradients); glibc's malloc returns each to the
// kernel and pays the page faults again, mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (15 in v2 and v3; the
/// `libmimalloc-sys` bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped instead of returning it to the kernel 10 ms
/// later (mimalloc's default): a training step frees its buffers and
/// allocates them again in the next, and every page given back is zeroed by
/// the kernel on its next fault. Measured on the main job at world 1: about
/// 2 800 page faults per step before, none after (`/usr/bin/time -v`), for
/// a peak RSS about 100 MB higher. `MIMALLOC_PURGE_DELAY` in the environment
/// still overrides it.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option of the allocator of this process; mimalloc
        // reads it at each purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// MiCS sharded data-parallel training on Burn.
#[derive(Parser)]
#[command(name = "mics", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every collective on the in-process engine and check the results.
    Collectives(commands::collectives::Args),
    /// Sentence embeddings (mean-pooled, L2-normalised) from a BERT checkpoint.
    Embed(commands::embed::Args),
    /// Logits of a token sequence (GPT-2, Llama: next token; BERT: masked LM).
    Logits(commands::logits::Args),
    /// Sample text from a GPT-2 or Llama checkpoint.
    Generate(commands::generate::Args),
    /// Predict memory and step time of DDP, ZeRO-2, ZeRO-3 and MiCS on a cluster.
    Plan(commands::plan::Args),
    /// Train GPT-2, BERT or Llama sharded with MiCS from a TOML config, on the
    /// CPU, wgpu or CUDA.
    Train(Box<commands::train::Args>),
    /// Write a sharded checkpoint as a Hugging Face-layout directory.
    Export(commands::export::Args),
    /// Prepare tokenized datasets (`mics data prepare`).
    Data(commands::data::Args),
    /// Training throughput of GPT-2 on Burn's CUDA backend, plain and MiCS at world 1,
    /// or the NCCL check (`--nccl`); `scripts/gpu-bench` runs it on a GPU machine.
    GpuBench(commands::gpu_bench::Args),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    // Unix tools end quietly when the reader of their output goes away
    // (`mics logits ... | head -c 10`): SIGPIPE back to its default for
    // every command but `train` and `gpu-bench`, whose MPI and NCCL sockets
    // must not raise it (`train`'s summary handles a broken pipe itself).
    #[cfg(unix)]
    if !matches!(cli.command, Command::Train(_) | Command::GpuBench(_)) {
        // SAFETY: restoring a signal's default disposition before any
        // thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Collectives(args) => commands::collectives::run(args),
        Command::Embed(args) => commands::embed::run(args),
        Command::Logits(args) => commands::logits::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Export(args) => commands::export::run(args),
        Command::Data(args) => commands::data::run(args),
        Command::GpuBench(args) => commands::gpu_bench::run(args),
    };
    if let Err(err) = result {
        // One line for the error and its causes, and a non-zero exit.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
