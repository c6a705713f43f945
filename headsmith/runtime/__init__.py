"""Runtime: engines, KV cache, generation, benchmarks."""
