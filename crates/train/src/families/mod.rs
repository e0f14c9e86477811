//! The model families `mics train` trains: one [`ModelFamily`](crate::ModelFamily)
//! impl per file, the glue between a plain Burn model and the trainer.

mod bert;
mod gpt2;
mod llama;

pub use bert::Bert;
pub use gpt2::Gpt2;
pub use llama::Llama;
