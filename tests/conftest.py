"""Shared pytest set-up: hypothesis profiles must exist before ``--hypothesis-profile``
is read, which happens before test modules are imported."""

import pytest
import torch

import tests.fuzz_models  # noqa: F401  (registers the "ci" and "long" profiles)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two fighting for cores. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quiet_transformers():
    """Tiny vocabularies make transformers log about GPT-2's bos/eos ids; not our concern."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)
