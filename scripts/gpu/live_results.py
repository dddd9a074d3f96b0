"""pytest plugin of the GPU check: one JSON line per test, written the moment the test finishes.

A JUnit report is written when pytest ends, so a pytest killed at its time budget loses every result; this file keeps
what finished. Loaded with `-p live_results` (scripts/gpu on the path); writes to the file named by `FT_TEST_RESULTS`.
Each line: `{"name", "outcome" (passed, failed, skipped, error), "message", "seconds"}`.
"""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FT_TEST_RESULTS")
    if not path:
        return
    # one line per test: its call, or the setup or teardown that failed or skipped it
    if report.when == "call" or (report.when != "call" and not report.passed):
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif not report.passed:
            message = (report.longreprtext or "").strip().splitlines()[-1:] or [""]
            message = message[0]
        line = {"name": report.nodeid.split("::", 1)[-1], "outcome": outcome, "message": message[:300],
                "seconds": round(report.duration, 3)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def read(path: str | os.PathLike) -> list[dict]:
    """The lines written so far (a line cut by a kill is left out)."""
    cases = []
    try:
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    cases.append(json.loads(text))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return cases
