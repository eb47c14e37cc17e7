"""Shared test settings: devices, dtypes, seeds and the tolerance table."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Absolute slack added to "2 x the error of the reference run in the same dtype" (flash-attention's rule).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    """Every device at hand (CUDA only where present: no skipped CUDA cases without one). Module-scoped, so that the
    engine tests' module-scoped model fixtures can build their tiny model on it."""
    return request.param
