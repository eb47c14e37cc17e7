"""Shared test settings: devices, seeds, the shared-data option. The op's dtypes and tolerance rules are in
tests/checking.py (the one checker).

With LATENTSEEK_REQUIRE_EXT=1 (set by .ci/run) importing latentseek_ext raises when its compiled kernels are
missing or fail to import; importing it here turns that into a failed run instead of skipped tests.
"""

from pathlib import Path

import pytest
import torch

import latentseek_ext  # noqa: F401  (see the docstring)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared-data",
        metavar="DIR",
        default=None,
        help="folder with the full benchmark copies (gsm8k_test.jsonl, math500_test.jsonl, aime24_test.jsonl); "
        "runs the tests marked shared_data, which are deselected without it",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data: reads the full benchmark files given by --shared-data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--shared-data"):
        return
    deselected = [item for item in items if item.get_closest_marker("shared_data")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("shared_data")]


@pytest.fixture(scope="session")
def shared_data(request: pytest.FixtureRequest) -> Path:
    """The --shared-data folder; a test that asks for it fails (never skips) when the folder is missing."""
    option = request.config.getoption("--shared-data")
    folder = Path(option) if option else None
    if folder is None or not folder.is_dir():
        pytest.fail(f"--shared-data must name a folder with the benchmark files, got {option!r}")
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    """Every device at hand (CUDA only where present: no skipped CUDA cases without one). Module-scoped, so that the
    engine tests' module-scoped model fixtures can build their tiny model on it."""
    return request.param
