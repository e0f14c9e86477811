//! BERT (work in progress).
