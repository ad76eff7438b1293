"""The command-line front door: every command has --help, unknown commands and flags fail in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bioaudio.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bioaudio {name}")


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_and_flag_are_one_line_errors(capsys):
    assert main(["prepar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean prepare" in err
    with pytest.raises(SystemExit) as e:
        main(["split", "m.csv", "--no-such-flag"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "bioaudio", "stats", "/no/such/manifest.csv"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "manifest not found" in r.stderr
