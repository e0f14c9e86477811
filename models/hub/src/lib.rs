//! Hugging Face interop (work in progress).
