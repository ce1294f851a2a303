# Benchmarks are scripts run by tests/bench/run.py, not tests: pytest must not collect them.
collect_ignore_glob = ["*.py"]
