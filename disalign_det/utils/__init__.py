"""Small helpers shared by the library, its tools and its benchmarks."""
