"""pyfast's benchmarks, installed as `pyfast.benchmarks`: the timing helper (`timing`), what is run
(`workloads`, `kernels`), the model report behind `python -m pyfast bench` (`report`), result
documents (`results`), and the pytest-benchmark suites (`test_*.py`, run by `pytest --benchmark`)."""
