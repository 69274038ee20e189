"""UI tests: the "Rate limits" page in-process, and the whole stack in a real browser (``-m browser``)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "browser: drives Debian's headless Chromium through the embedded stack (about 2 minutes; "
        "needs apt packages chromium and chromium-driver, skipped without them)",
    )
