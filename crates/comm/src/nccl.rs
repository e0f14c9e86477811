//! The NCCL engine (being written).
