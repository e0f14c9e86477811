//! The MPI engine (being written).
