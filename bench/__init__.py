"""Benchmarks of reid_core (run as scripts: ``python -m bench.eval_speed``)."""
