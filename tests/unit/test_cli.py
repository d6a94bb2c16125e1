import subprocess
import sys

from moeray import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "serve", "bench", "plan", "dashboards"):
        assert name in out


def test_unknown_command_is_an_error(capsys):
    try:
        cli.main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    assert "frobnicate" in capsys.readouterr().err


def test_import_starts_neither_torch_nor_ray():
    code = (
        "import sys, moeray, moeray.cli; "
        "bad = [m for m in ('torch', 'ray', 'triton') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_console_script_help():
    r = subprocess.run(
        [sys.executable, "-m", "moeray.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "dashboards" in r.stdout
