"""Small helpers shared by the benchmarks and tools."""
