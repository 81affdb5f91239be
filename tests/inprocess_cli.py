"""`thrifty` commands run in this process through `thrifty.cli.main` (exit code, stdout, stderr), for
tests that call a command many times: a subprocess per call costs a second of start-up each."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from thrifty.cli import main

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["thrifty", *args])
        monkeypatch.setenv("COLUMNS", "250")
        with pytest.raises(SystemExit) as done:
            main()
        captured = capsys.readouterr()
        return int(done.value.code or 0), captured.out, captured.err

    return run
