"""hdslb benchmarks against its peers (`make bench`, `python -m bench.run`); see bench/README.md."""
