"""The README's "Use it as a proxy" section, run as written, from a folder that is not the repo's.

The commands are read from the README itself, so the text and the behaviour cannot drift apart:
only `.venv/bin/` (this test's interpreter) and the port (a free one, not 8080) are substituted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _proxy_section() -> tuple[list[str], str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use it as a proxy") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)
    kinds = [kind for kind, _ in blocks]
    assert kinds == ["bash", "python", "bash"], kinds
    setup = [line.split("  #")[0].strip() for line in blocks[0][1].splitlines() if line.strip()]
    after = [line.split("  #")[0].strip() for line in blocks[2][1].splitlines() if line.strip()]
    return setup, blocks[1][1], after


def _local(command: str, port: int) -> str:
    command = command.replace(".venv/bin/thrifty", "\0 -m thrifty").replace(".venv/bin/python", "\0")
    command = command.replace("\0", sys.executable)
    return command + (f" --port {port}" if command.endswith(" serve") else "")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["COLUMNS"] = "120"
    return env


def test_readme_proxy_section_runs_as_written_in_a_fresh_folder(tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="the example's faq route uses the semantic extra")
    setup, snippet, after = _proxy_section()
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    port = _free_port()
    cp, keys, serve = setup
    assert (
        cp.startswith("cp examples/thrifty.yaml thrifty.yaml") and "keys create" in keys and "serve" in serve
    )
    subprocess.run(_local(cp, port), shell=True, cwd=tmp_path, check=True)
    made = subprocess.run(
        _local(keys, port), shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("thr-")

    proc = subprocess.Popen(
        _local(serve, port),
        shell=True,
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # one line once it listens
        assert line.startswith(f"thrifty serving http://127.0.0.1:{port}/v1"), line
        assert f"settings {tmp_path / 'thrifty.yaml'}" in line and f"ledger {tmp_path / 'thrifty.db'}" in line
        assert "routes: support" in line

        script = snippet.replace("thr-...", key).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        ran = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        answer, cost, request_id = ran.stdout.rsplit(maxsplit=2)
        assert answer == "Hi! How can I help you today?" and request_id.startswith("req_")
        # gpt-4o-mini-2024-07-18 at $0.15 / $0.60 per million: 8 prompt and 9 completion tokens.
        assert Decimal(cost) == (8 * Decimal("0.15") + 9 * Decimal("0.60")) / 1_000_000

        report = subprocess.run(
            _local(after[0], port) + " --format json",
            shell=True,
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert report.returncode == 0, report.stderr
        (row,) = json.loads(report.stdout)
        assert row["group"] == "onboarding" and Decimal(row["cost_usd"]) == Decimal(cost)
        table = subprocess.run(
            _local(after[0], port), shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True
        )
        assert table.returncode == 0 and "onboarding" in table.stdout and "Traceback" not in table.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # Keys the shell did not set: the start says so, naming each variable, and nothing crashed.
    assert "ANTHROPIC_API_KEY is not set" in err and "GEMINI_API_KEY is not set" in err
    assert "OPENAI_API_KEY is not set" not in err  # the README's serve line sets it
    assert "Traceback" not in err


def test_the_example_starts_without_the_shared_data(tmp_path: Path):
    from thrifty.gateway import Gateway
    from thrifty.settings import load_settings

    shutil.copy(REPO / "examples" / "thrifty.yaml", tmp_path / "thrifty.yaml")
    settings = load_settings(tmp_path / "thrifty.yaml")
    assert all("shared" not in d for p in settings.providers.values() for d in p.data)
    Gateway(settings)  # every stage and provider builds, the replay provider from the built-in set


def test_a_missing_replay_path_names_the_setting_and_what_it_is_relative_to(tmp_path: Path):
    config = tmp_path / "conf" / "thrifty.yaml"
    config.parent.mkdir()
    config.write_text(
        "providers: {rec: {kind: replay, data: [../nowhere/data]}}\n"
        "models: {m: {provider: rec, upstream: gpt-4o-mini}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "serve", "-c", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "providers.rec.data" in out.stderr and "relative to the folder of that file" in out.stderr


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00binary\x00", "storage: {url: 'sqlite:///caf\xe9.db'}".encode("latin-1")]
)
def test_settings_that_are_not_utf8_are_one_line_and_exit_2(tmp_path: Path, content: bytes):
    config = tmp_path / "thrifty.yaml"
    config.write_bytes(content)
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", "keys", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not UTF-8" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_readme_library_example_runs_as_written(tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="the example's faq route uses the semantic extra")
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use it as a library") :]
    (snippet,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 3)], flags=re.S)
    shutil.copy(REPO / "examples" / "thrifty.yaml", tmp_path / "thrifty.yaml")
    ran = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    answer, cost = ran.stdout.rsplit(maxsplit=1)
    assert answer == "Hi! How can I help you today?"
    assert Decimal(cost) == (8 * Decimal("0.15") + 9 * Decimal("0.60")) / 1_000_000


def test_thrifty_is_a_package_with_its_public_api():
    import thrifty

    assert thrifty.__file__ is not None and thrifty.__file__.endswith("__init__.py")  # not a namespace
    from thrifty import Completion, Gateway, Settings, Streamed, ThriftyError, load_settings

    assert Gateway.__module__ == "thrifty.gateway" and issubclass(ThriftyError, Exception)
    assert {Completion.__name__, Streamed.__name__, Settings.__name__, load_settings.__name__}
    with pytest.raises(AttributeError):
        thrifty.nope  # noqa: B018
