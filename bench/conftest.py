"""``pytest bench --benchmark-only``: a table that fits a terminal.

pytest-benchmark's default table has ten statistics per row (about 200 columns); this keeps the ones the decode
suite is read by (median, interquartile range, rounds), and the test name without its
module. Pass ``--benchmark-columns=...`` (or ``--benchmark-name=...``) to choose others; ``--benchmark-json PATH``
keeps every statistic.
"""

COLUMNS = ["median", "iqr", "rounds"]


def pytest_configure(config):
    option = config.option
    if not hasattr(option, "benchmark_columns"):   # pytest-benchmark is not installed
        return
    given = " ".join(config.invocation_params.args)
    if "--benchmark-columns" not in given:
        option.benchmark_columns = COLUMNS
    if "--benchmark-name" not in given:
        option.benchmark_name = "short"
