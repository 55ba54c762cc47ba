"""Load and micro benchmarks for line-gateway (`python -m bench.run`; see bench/README.md)."""
