//! Holds no code: the benchmarks are in `benches/`.
