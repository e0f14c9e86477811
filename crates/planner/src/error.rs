//! Errors of the planner: every one names the input that is wrong.

use std::path::PathBuf;

/// What can go wrong while building or evaluating a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--model` is neither a preset name nor a readable file.
    #[error(
        "unknown model `{name}` (presets: {presets}; or give a path to a Hugging Face config.json)"
    )]
    UnknownModel {
        /// What the user asked for.
        name: String,
        /// The preset names, comma-separated.
        presets: String,
    },
    /// `--cluster` is not a preset name.
    #[error("unknown cluster `{name}` (presets: {presets})")]
    UnknownCluster {
        /// What the user asked for.
        name: String,
        /// The preset names, comma-separated.
        presets: String,
    },
    /// A config.json could not be read.
    #[error("cannot read model config {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// A config.json is not valid JSON.
    #[error("malformed model config {path}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: serde_json::Error,
    },
    /// A config.json is JSON but lacks a field we need, or holds a bad value.
    #[error("model config {path}: {problem}")]
    ModelConfig {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        problem: String,
    },
    /// The training or cluster configuration is inconsistent.
    #[error("{0}")]
    InvalidConfig(String),
    /// Drawing the plot failed.
    #[error("cannot draw plot {path}: {problem}")]
    Plot {
        /// The output file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
}
