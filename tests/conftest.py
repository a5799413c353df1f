"""Fixtures and hooks only; what tests share otherwise is in tests/helpers.py.

Fixtures: `sandbox` (the agent as PID 1 of new namespaces, torn down after the test),
`image_dir` (the bootstrap image, built once per run) and `hypervisor` (a simulated VMware
hypervisor on a unix socket: (sim, path) for the agent's --backdoor-sim). Hooks: under
strict mode (CI=true, `make test-strict`) a skip fails unless it is an allowed missing
facility or a test that does not apply here; every run ends with one line counting the
skips by reason.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from helpers import (ALLOWED_MISSING, REPO, MissingFacility, NotApplicable, SandboxRunner,
                     build_image, require_namespaces, simulated_hypervisor, strict_mode)


@pytest.fixture
def sandbox(tmp_path):
    require_namespaces()
    runner = SandboxRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="session")
def image_dir() -> Path:
    return build_image(REPO / "build")


@pytest.fixture
def hypervisor(tmp_path):
    with simulated_hypervisor(tmp_path) as found:
        yield found


# -- skips: strict mode and the closing count ---------------------------------------------
def _classify_skip(exc, reason: str) -> tuple[str, bool]:
    """(what the closing line counts the skip as, whether strict mode lets it skip)."""
    if isinstance(exc, MissingFacility):
        if exc.facility in ALLOWED_MISSING:
            return f"{exc.facility} (allowed)", True
        return exc.facility, False
    if isinstance(exc, NotApplicable):
        return "not applicable here", True
    return f"undeclared skip ({reason})", False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or call.excinfo is None or hasattr(report, "wasxfail"):
        return
    exc = call.excinfo.value
    reason = getattr(exc, "msg", None) or str(exc)
    kind, allowed = _classify_skip(exc, reason)
    report.user_properties += [("skip_kind", kind), ("skip_allowed", allowed)]
    if isinstance(exc, (MissingFacility, NotApplicable)):
        path, line, _ = item.reportinfo()     # the test, not the helper that raised
        report.longrepr = (str(path), (line or 0) + 1, f"{kind}: {reason}")
    if strict_mode() and not allowed:
        report.outcome = "failed"
        report.longrepr = (
            f"strict mode (CI=true or make test-strict): this test would have skipped: "
            f"{reason} (only {', '.join(ALLOWED_MISSING)} may be missing: see "
            f"ALLOWED_MISSING in tests/helpers.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (e.g. a module-level importorskip)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict_mode():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"strict mode (CI=true or make test-strict): {collector.nodeid} "
                           f"would have been skipped whole: {reason}")


def pytest_terminal_summary(terminalreporter):
    skipped = [dict(getattr(r, "user_properties", ()))
               for r in terminalreporter.stats.get("skipped", [])]
    if not skipped:
        return
    kinds = Counter(props.get("skip_kind", "other") for props in skipped)
    parts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    strict_would_fail = not all(props.get("skip_allowed") for props in skipped)
    terminalreporter.write_line(f"skipped {len(skipped)}: {parts}"
                                + (" (CI=true or make test-strict would fail the run)"
                                   if strict_would_fail else ""))
