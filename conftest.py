"""Repository-wide pytest options: `pytest` runs the tests, `pytest --benchmark` the benchmark suites."""


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the pytest-benchmark suites in benchmarks/ (and not the tests)")


def pytest_configure(config):
    if config.getoption("--benchmark"):
        config.args[:] = [a for a in config.args if a != "tests"] or ["benchmarks"]


def pytest_collection_modifyitems(config, items):
    benchmarking = config.getoption("--benchmark")
    suites = config.rootpath / "benchmarks"
    keep, drop = [], []
    for item in items:
        (keep if item.path.is_relative_to(suites) == benchmarking else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
