"""`qserve completion bash|zsh`: the script is valid bash, and a real bash completes with it."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest

from qserve import completion


def _script(capsys, shell: str) -> str:
    assert completion.main(argparse.Namespace(shell=shell)) == 0
    return capsys.readouterr().out


def _complete(script_path, words: list[str]) -> list[str]:
    """What bash's completion function offers for the last word of `words` (a real bash)."""
    line = " ".join(words)
    program = (f'source "{script_path}"; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
               f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; _shtab_qserve; printf "%s\\n" "${{COMPREPLY[@]}}"')
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_script_is_valid_and_completes_subcommands(capsys, tmp_path):
    script = _script(capsys, "bash")
    path = tmp_path / "qserve.bash"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    assert "stream" in script and "serve" in script
    assert _complete(path, ["qserve", "se"]) == ["serve"]
    assert _complete(path, ["qserve", "stream", "wa"]) == ["watch"]
    assert _complete(path, ["qserve", "stream", "watch", "--ind"]) == ["--index", "--index-only"]
    assert _complete(path, ["qserve", "stream", "dl"]) == ["dlq"]
    assert _complete(path, ["qserve", "stream", "dlq", "re"]) == ["replay"]
    assert _complete(path, ["qserve", "stream", "dlq", "replay", "--a"]) == ["--all"]


def test_zsh_script_names_the_commands(capsys, tmp_path):
    script = _script(capsys, "zsh")
    assert script.startswith("#compdef qserve") and "stream" in script and "serve" in script
    if shutil.which("zsh"):             # not installed everywhere; bash is
        path = tmp_path / "_qserve"
        path.write_text(script)
        assert subprocess.run(["zsh", "-n", str(path)], capture_output=True, timeout=30).returncode == 0


def test_only_known_shells():
    parser = argparse.ArgumentParser()
    completion.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["fish"])
