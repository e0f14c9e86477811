//! Collectives for MiCS (being written).
