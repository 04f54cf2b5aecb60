"""Merge the JUnit XML reports of the concurrent test groups: the 15 slowest tests, then one
closing line with the totals (``tests: N passed, N failed, N skipped``)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SLOWEST = 15


def main(reports: list[str]) -> int:
    timings: list[tuple[float, str]] = []
    passed = failed = skipped = 0
    for report in reports:
        path = Path(report)
        if not path.is_file():
            print(f"summary: {report} is missing (its test group did not finish)")
            failed += 1
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            timings.append((float(case.get("time") or 0.0), name))
            if case.find("skipped") is not None:
                skipped += 1
            elif case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            else:
                passed += 1
    print(f"=== {SLOWEST} slowest tests ===")
    for seconds, name in sorted(timings, reverse=True)[:SLOWEST]:
        print(f"{seconds:8.1f}s  {name}")
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
