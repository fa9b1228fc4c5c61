import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Small tensors: one intra-op thread is fastest and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session", autouse=True)
def _no_output_in_the_checkout():
    """Tests write below their tmp_path, never into the checkout's runs/ folder."""
    runs = os.path.join(ROOT, "runs")
    before = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    yield
    after = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    assert after <= before, f"tests wrote into {runs}: {sorted(after - before)}"
