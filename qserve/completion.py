"""`qserve completion bash|zsh`: a shell completion script generated from qserve's own argparse tree.

Strategy: the script is never written by hand; `shtab` walks the parser that `qserve.cli` builds
(every subcommand, `stream` and its commands included, with their flags and choices), so the
completion cannot drift from the commands. The full parser is built inside `main`, not at import
time, because `qserve.cli` imports this module while building that very parser.

Install:
    qserve completion bash > ~/.local/share/bash-completion/completions/qserve
    qserve completion zsh > "${fpath[1]}/_qserve"
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main", "SHELLS"]

SHELLS = ("bash", "zsh")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The one argument: which shell's script to print."""
    parser.add_argument("shell", choices=SHELLS, help="the shell to print a completion script for")


def main(args: argparse.Namespace) -> int:
    """Print the completion script on stdout; a missing `shtab` is one ``[ERROR]`` line and status 1."""
    try:
        import shtab
    except ModuleNotFoundError:
        print("[ERROR] shell completion needs the shtab package: pip install 'shtab>=1.7,<2'",
              file=sys.stderr)
        return 1
    from qserve.cli import build_parser
    script = shtab.complete(build_parser(), shell=args.shell)
    try:
        sys.stdout.write(script if script.endswith("\n") else script + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return 1
    return 0
