"""Shared pytest set-up: hypothesis profiles must exist before ``--hypothesis-profile``
is read, which happens before test modules are imported."""

import tests.fuzz_models  # noqa: F401  (registers the "ci" and "long" profiles)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes each) run only with --slow or when -m names them."""
    if config.getoption("--slow") or "slow" in (config.getoption("-m") or ""):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --slow (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
