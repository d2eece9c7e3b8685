"""Benchmarks: FLOP model (flops.py) and training-step throughput / MFU (throughput.py)."""
