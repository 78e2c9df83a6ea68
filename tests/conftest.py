"""Shared pytest set-up: hypothesis profiles must exist before ``--hypothesis-profile``
is read, which happens before test modules are imported."""

import tests.fuzz_models  # noqa: F401  (registers the "ci" and "long" profiles)
