"""Every command and subcommand, called the wrong way, ends in a one-line usage error, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest
import typer

from thrifty.cli import app


def _leaves_and_groups() -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    root = typer.main.get_command(app)
    leaves: list[tuple[str, ...]] = []
    groups: list[tuple[str, ...]] = [()]

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            if getattr(sub, "commands", None) is not None and hasattr(sub, "list_commands"):
                groups.append((*path, name))
                walk(sub, (*path, name))
            else:
                leaves.append((*path, name))

    walk(root, ())
    return leaves, groups


def _command(path: tuple[str, ...]) -> object:
    cmd: object = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


LEAVES, GROUPS = _leaves_and_groups()


def _cases() -> list[tuple[tuple[str, ...], set[int]]]:
    cases: list[tuple[tuple[str, ...], set[int]]] = []
    for path in GROUPS:
        cases.append((path, {0, 2}))  # no subcommand: help
        cases.append(((*path, "bogus-command"), {2}))
    for path in LEAVES:
        cmd = _command(path)
        cases.append(((*path, "--no-such-option"), {2}))
        params = getattr(cmd, "params", [])
        if any(getattr(p, "required", False) for p in params):
            cases.append((path, {2}))  # a required option missing
        valued = [
            param
            for param in params
            if any(o.startswith("--") for o in getattr(param, "opts", []))
            and not getattr(param, "is_flag", False)
        ]
        if valued:
            cases.append(((*path, _long(valued[0])), {2}))  # an option without its value
        for param in valued:
            annotation = str(getattr(getattr(param, "type_descriptor", None), "annotation", ""))
            if "int" in annotation or "float" in annotation:
                cases.append(((*path, _long(param), "abc"), {2}))  # a value of the wrong type
    return cases


def _long(param: object) -> str:
    return next(o for o in getattr(param, "opts", []) if o.startswith("--"))


CASES = _cases()


def _run(args: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thrifty", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_every_command_is_covered():
    # The walk found the commands a user meets first; a new command is covered without editing this.
    assert {("serve",), ("report",), ("keys", "create"), ("keys", "revoke"), ("bench", "overhead")} <= set(
        LEAVES
    )
    assert {("keys",), ("bench",), ("route",), ("cache",)} <= set(GROUPS)
    assert len(CASES) > 40
    assert any(args[-1:] == ("abc",) for args, _ in CASES)


def test_usage_errors_are_one_clear_message_and_exit_2(tmp_path: Path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: (case, _run(case[0], tmp_path)), CASES))
    failures = []
    for (args, codes), out in results:
        text = out.stdout + out.stderr
        if "Traceback" in text or out.returncode not in codes or not text.strip():
            failures.append(f"thrifty {' '.join(args)} -> exit {out.returncode}: {text[-300:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("keys", "create"), "Missing option '--tenant'"),
        (("report", "--nope"), "No such option: --nope"),
        (("bogus",), "No such command 'bogus'"),
        (("serve", "--port", "abc"), "Invalid value for '--port'"),
        (("report", "--by"), "Option '--by' requires an argument"),
    ],
)
def test_the_message_says_what_is_wrong(tmp_path: Path, args: tuple[str, ...], expected: str):
    out = _run(args, tmp_path)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_click_exceptions_of_either_click_are_caught():
    from thrifty.cli import _usage_error_types

    kinds = _usage_error_types()
    assert click.ClickException in kinds
    from typer._click.exceptions import ClickException

    assert ClickException in kinds


@pytest.mark.parametrize(
    "args",
    [
        ("cache", "tune", "--data", "labelled.csv"),
        ("bench", "cache", "--train", "labelled.csv", "--test", "labelled.csv"),
    ],
)
@pytest.mark.parametrize("blocked", ["onnxruntime", "tokenizers"])
def test_commands_that_embed_say_how_to_install_the_semantic_extra(tmp_path: Path, args, blocked):
    (tmp_path / "labelled.csv").write_text("text,category\nlost my card,card\ncard lost,card\nrate?,fx\n")
    script = (
        f"import sys; sys.modules[{blocked!r}] = None; sys.argv = ['thrifty', *{list(args)!r}]; "
        "from thrifty.cli import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"needs the semantic extra ({blocked} is not installed)" in out.stderr
    assert "pip install 'thrifty[semantic]'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: " ".join(g) or "thrifty")
def test_command_summaries_flow_as_one_paragraph_in_help(tmp_path: Path, group: tuple[str, ...]):
    """A docstring's line breaks are source formatting: the command list must not keep them."""
    import inspect

    wide = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run(
        [sys.executable, "-m", "thrifty", *group, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env=wide,
    ).stdout
    rendered = [" ".join(line.strip("│ ").split()) for line in out.splitlines()]
    for name, sub in getattr(_command(group), "commands", {}).items():
        # (Markdown: `code` is shown without its backticks.)
        lines = inspect.cleandoc(sub.help or "").replace("`", "").split("\n\n")[0].splitlines()
        if len(lines) < 2:
            continue
        end_of_first, start_of_second = lines[0].split()[-1], lines[1].split()[0]
        assert any(f"{end_of_first} {start_of_second}" in line for line in rendered), (group, name)
