"""A warning raised while a console command runs reaches the user as one line in the CLI's own voice,
not as Python's ``file:line: UserWarning:`` with a library's source line."""

from __future__ import annotations

import subprocess
import sys

_CONSOLE = r'''
import sys, warnings
import x2recon.cli as cli

def warns(a):
    warnings.warn("spacing np.float64(1.5) looks odd")
    return 0

build = cli.build_parser
def parser():
    p = build()
    p._subparsers._group_actions[0].choices["info"].set_defaults(func=warns)
    return p
cli.build_parser = parser
sys.argv = ["x2recon", "info", "--bundled"]
sys.exit(cli.main())
'''


def test_console_command_prints_a_warning_as_one_line():
    r = subprocess.run([sys.executable, "-c", _CONSOLE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "x2recon info: warning: spacing 1.5 looks odd\n"


def test_main_called_from_python_keeps_the_callers_warning_handling(monkeypatch):
    import warnings

    import pytest

    import x2recon.cli as cli

    def warns(a):
        warnings.warn("from inside the command")
        return 0

    build = cli.build_parser

    def parser():
        p = build()
        p._subparsers._group_actions[0].choices["info"].set_defaults(func=warns)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    with pytest.warns(UserWarning, match="from inside the command"):
        assert cli.main(["info", "--bundled"]) == 0
