//! Scale planner for MiCS (work in progress).
