"""Fixtures shared by the test modules."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def peak_cache(tmp_path_factory):
    """The device's measured peak (``mocolab.utilisation``) is kept in a temporary cache
    folder, not the user's: measured once per test session."""
    before = os.environ.get("MOCOLAB_CACHE")
    os.environ["MOCOLAB_CACHE"] = str(tmp_path_factory.mktemp("mocolab-cache"))
    yield
    if before is None:
        os.environ.pop("MOCOLAB_CACHE", None)
    else:
        os.environ["MOCOLAB_CACHE"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
