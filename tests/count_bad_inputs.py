"""Count the bad-input test cases by class.

    python tests/count_bad_inputs.py [--json]

Every test of bad user input carries `@pytest.mark.bad_input("CLASS")`. This collects the suite
without running it and counts each case (each parametrization) once, under its class.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


class CountBadInputs:
    """A pytest plugin that counts the collected cases by their `bad_input` class."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("bad_input")
            if marker is not None:
                self.counts[marker.args[0]] += 1


def count() -> dict[str, int]:
    plugin = CountBadInputs()
    code = pytest.main(
        [
            "--collect-only",
            "-o",
            "addopts=",
            "-p",
            "no:terminal",
            "-p",
            "no:cacheprovider",
            str(TESTS),
        ],
        plugins=[plugin],
    )
    if code != 0:
        raise SystemExit(f"collecting the tests failed (pytest exit {code})")
    return {**dict(sorted(plugin.counts.items())), "total": sum(plugin.counts.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    counts = count()
    if args.json:
        print(json.dumps(counts))
        return
    width = max(map(len, counts))
    for name, n in counts.items():
        print(f"{name:<{width}}  {n}")


if __name__ == "__main__":
    sys.exit(main())
