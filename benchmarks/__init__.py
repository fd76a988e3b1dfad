"""Speed and memory benchmarks of kalm_lib beside sentence-transformers (run as ``python -m benchmarks.<name>``)."""
