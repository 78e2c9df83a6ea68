"""Shared pytest set-up: hypothesis profiles must exist before ``--hypothesis-profile``
is read, which happens before test modules are imported."""

import os

import pytest
import torch

import tests.fuzz_models  # noqa: F401  (registers the "ci" and "long" profiles)

# The suite runs on pinned threads (OMP_NUM_THREADS, default 1; scripts/run.sh sets it too),
# in this process and every subprocess it starts, so its stated time holds on a loaded
# machine: the models are tiny, and a thread per core only waits for cores.
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
torch.set_num_threads(THREADS)


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
