"""PEFT's own test suite on SMEAR: apply the matrix filters and the expectations of `expectations.py`, and report
the conformance counts at the end of the run."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from .expectations import classify

_OUTCOMES: collections.Counter = collections.Counter()
#: Collected cases per entry of `expectations.py` (its category and title).
_LISTED: collections.Counter = collections.Counter()


def pytest_configure(config):
    # Thousands of tiny-tensor ops: one intra-op thread is several times faster than two on a loaded 2-core machine.
    torch.set_num_threads(int(os.environ.get("SMEAR_PEFT_SUITE_THREADS", "1")))
    config.addinivalue_line("markers", "peft_not_applicable: a PEFT test that cannot apply to routed adapters")
    config.addinivalue_line("markers", "peft_known_bug: a PEFT test failing because of a known smear-peft bug")


def pytest_collection_modifyitems(session, config, items):
    kept, deselected = [], []
    for item in items:
        if "peft_suite" not in item.nodeid or not hasattr(item, "callspec"):
            kept.append(item)
            continue
        select = getattr(item.module, "select", None)
        if select is not None and not select(item.callspec.params):
            deselected.append(item)
            continue
        kept.append(item)
        expectation = classify(item.originalname, item.callspec.params)
        if expectation is not None:
            _LISTED[(expectation.category, expectation.title)] += 1
            item.add_marker(expectation.marker())
            item.add_marker(getattr(pytest.mark, expectation.category)(expectation.title))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_runtest_logreport(report):
    if "peft_suite" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        listed = "peft_not_applicable" in report.keywords or "peft_known_bug" in report.keywords
        if report.skipped and not hasattr(report, "wasxfail") and not (listed and "not applicable:" in str(report.longrepr)):
            _OUTCOMES["skipped by PEFT's own test"] += 1
        elif report.failed:
            _OUTCOMES["FAILED (not listed, or XPASS of a listed case)"] += 1
        elif "peft_not_applicable" in report.keywords:
            _OUTCOMES["not applicable (listed in expectations.py)"] += 1
        elif "peft_known_bug" in report.keywords:
            _OUTCOMES["known bug (listed in expectations.py)"] += 1
        else:
            _OUTCOMES[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if _OUTCOMES:
        terminalreporter.write_sep("=", "PEFT conformance (tests/peft_suite)")
        for outcome, count in sorted(_OUTCOMES.items()):
            terminalreporter.write_line(f"{count:6d} {outcome}")
        for (category, title), count in sorted(_LISTED.items()):
            terminalreporter.write_line(f"{count:6d}   of them {category.removeprefix('peft_').replace('_', ' ')}: {title}")
        from .adopt import DROPPED

        for cls, names in sorted(DROPPED.items()):
            terminalreporter.write_line(
                f"{cls}: {len(names)} PEFT tests of specific methods (not parametrised by the method matrix) not run: "
                + ", ".join(names)
            )
