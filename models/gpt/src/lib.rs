//! GPT-2 (work in progress).
