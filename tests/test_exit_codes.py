"""The exit codes of ``ddpm-cars``, as RELIABILITY.md states them and ``--help`` repeats them."""

import errno
import re
import signal
from pathlib import Path

import pytest

from ddpm_cars import cli, commands
from ddpm_cars.errors import UserError
from ddpm_cars.training.optim import NonFiniteLossError

RELIABILITY = Path(__file__).parents[1] / "RELIABILITY.md"


def _failing_report(monkeypatch, error: BaseException) -> None:
    """``ddpm-cars report`` raising ``error`` once its arguments are parsed."""

    def report(request):
        raise error

    monkeypatch.setattr(commands, "report", report)


def _run(tmp_path, capsys) -> tuple[int, str]:
    code = cli.main(["report", str(tmp_path)])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm-cars: error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    _failing_report(monkeypatch, UserError("--thing must be positive; got -1"))
    code, err = _run(tmp_path, capsys)
    assert code == 2 and "--thing must be positive" in _one_error_line(err)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_a_refusing_environment_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys, number):
    _failing_report(monkeypatch, OSError(number, "refused", "/runs/x/checkpoints"))
    code, err = _run(tmp_path, capsys)
    assert code == 1 and "refused" in _one_error_line(err)


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError(errno.ENOENT, "No such file", "/inside/the/package"), IsADirectoryError("a bug"), OSError("x")],
)
def test_an_os_error_that_is_a_bug_keeps_its_traceback_and_exits_1(monkeypatch, tmp_path, capsys, error):
    _failing_report(monkeypatch, error)
    code, err = _run(tmp_path, capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in report" in err  # the frame that raised
    assert err.strip().splitlines()[-1].startswith("ddpm-cars: internal error: this is a bug")


def test_a_diverged_run_exits_3_with_one_line(monkeypatch, tmp_path, capsys):
    _failing_report(monkeypatch, NonFiniteLossError("the loss was not finite ...; resume from runs/x/checkpoints/..."))
    code, err = _run(tmp_path, capsys)
    assert code == 3 and "resume from" in _one_error_line(err)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interruption_exits_128_plus_the_signal(monkeypatch, tmp_path, capsys, signum, code):
    interrupt = KeyboardInterrupt()
    interrupt.signum = signum
    _failing_report(monkeypatch, interrupt)
    got, err = _run(tmp_path, capsys)
    assert got == code and f"interrupted ({signal.Signals(signum).name})" in err


def test_help_and_reliability_state_the_same_codes():
    table = RELIABILITY.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    stated = {int(code) for pair in re.findall(r"^\| (\d+)(?:, (\d+))? \|", table, re.M) for code in pair if code}
    epilog = cli.build_parser().epilog
    shown = {int(code) for code in re.findall(r"^\s+(\d+)\s", epilog, re.M)} | {
        int(code) for code in re.findall(r"(\d+) by SIGTERM", epilog)
    }
    assert stated == shown == {0, 1, 2, 3, 130, 143}
    assert "RELIABILITY.md" in epilog
