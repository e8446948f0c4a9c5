"""Shared test set-up: deterministic torch threads and a clean environment for plugin loading."""

import os

import pytest

# plugin loading must not be steered by the developer's shell
for _var in ("DSK_LOAD_PLUGINS", "DSK_DISABLE_PLUGINS", "DSK_STRICT_PLUGINS"):
    os.environ.pop(_var, None)


@pytest.fixture(autouse=True)
def _torch_threads():
    """One intra-op thread per test process: pytest-xdist runs two processes on two cores."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    yield
