"""Run a Markdown file's code blocks as shell sessions, so that the README cannot drift.

Strategy: `parse` reads the fenced blocks and the HTML-comment markers in front of them;
`sessions` groups the blocks that must share one shell; `run_session` writes a session as one
bash script and runs it in a fresh directory, in a process group of its own, with a deadline,
and stops the whole group (SIGTERM, then SIGKILL) when it is over; `check_expectations` compares
each block's output with the `# -> ...` lines written under its commands.

The rules a README follows (stated here and in tests/process/test_readme.py):

- Every fence names its language. ``sh`` and ``python`` blocks are run, ``toml`` blocks are
  loaded as configuration files (by the test), ``text`` blocks are never run. Any other
  language is an error, so a block cannot escape the test by its spelling.
- A marker on the line(s) right before a fence changes how the block is run:
  ``<!-- readme-test: DIRECTIVE[; DIRECTIVE...] -->`` with the directives
  ``skip REASON`` (not run; the reason is required and visible in the source),
  ``session NAME`` (run in the shell of session NAME, by default the block's own section),
  ``file NAME`` (the block is saved as the file NAME in the session's directory, not run),
  ``server ARGS`` (``qserve serve ARGS`` is started in the background first, and waited for,
  for a section whose prose says a server is running). An unknown directive is an error.
- The blocks of one session (by default: of one section, the nearest heading above them) run in
  README order in one ``bash`` with ``set -eu -o pipefail``; a ``python`` block runs as
  ``python -`` in that shell, so it sees the servers the ``sh`` blocks before it started.
- Ports 8080-8089 in the blocks are rewritten to free ports (the same number always to the same
  port within a session), and ``QSERVE_PORT`` names the port that stands for 8080, so a README
  example that starts ``qserve serve`` with no ``--port`` does not clash with a server already
  on 8080 either.
- A comment line ``# -> TEXT`` states output: TEXT up to the first run of two spaces (the rest
  is commentary) must appear in that block's stdout; ``<name>`` in it stands for any run of
  non-blank characters (a UUID, a timestamp), ``<...>`` for anything on the line.
- A session fails when bash exits non-zero, when its deadline passes, or when its stderr shows a
  Python traceback or "command not found". (Like any ``set -e`` script, a failure in the middle
  of an ``a && b`` list does not stop it: run examples avoid such lists.)
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Block", "ReadmeError", "SessionResult", "parse", "sessions", "build_script",
           "run_session", "check_expectations", "expectations"]

RUN_LANGS = ("sh", "python")
KNOWN_LANGS = ("sh", "python", "toml", "text")
DIRECTIVES = ("skip", "session", "file", "server")

_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_EXPECT = re.compile(r"^\s*# -> (.*)$")
_PLACEHOLDER = re.compile(r"(<\.\.\.>|<[^<>\s]+>)")
_BAD_STDERR = ("Traceback (most recent call last)", "command not found")
_PORT = re.compile(r"\b808[0-9]\b")
_SEPARATOR = "@@readme-block {}@@"
_SEPARATOR_RE = re.compile(r"^@@readme-block (\d+)@@$", re.M)


class ReadmeError(ValueError):
    """The Markdown breaks one of the rules above; the message names the line."""


@dataclass
class Block:
    """One fenced code block and what its marker says about it."""

    lang: str
    code: str
    line: int                      # 1-based line of the opening fence
    heading: str                   # the nearest heading above it
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def session(self) -> str:
        return self.directives.get("session", self.heading)

    @property
    def runs(self) -> bool:
        """Run as a command (``sh``/``python``, neither skipped nor saved as a file)."""
        return self.lang in RUN_LANGS and not {"skip", "file"} & self.directives.keys()

    @property
    def in_session(self) -> bool:
        """Part of a session's script: run, or saved as a file for later blocks."""
        return self.runs or ("file" in self.directives and "skip" not in self.directives)

    def where(self) -> str:
        return f"README line {self.line} ({self.heading!r})"


def _directives(text: str, line: int) -> dict[str, str]:
    """``key value; key value`` -> dict; a ``;`` not followed by a directive name belongs to the
    value (a skip reason may contain one)."""
    items: list[str] = []
    for part in text.split(";"):
        if items and part.strip().partition(" ")[0] not in DIRECTIVES:
            items[-1] += ";" + part
        else:
            items.append(part)
    out = {}
    for item in filter(None, (item.strip() for item in items)):
        key, _, value = item.partition(" ")
        if key not in DIRECTIVES:
            raise ReadmeError(f"line {line}: unknown readme-test directive {key!r} (known: {', '.join(DIRECTIVES)})")
        if not value.strip() and key != "server":
            raise ReadmeError(f"line {line}: readme-test directive {key!r} needs a value (skip needs a reason)")
        out[key] = value.strip()
    return out


def parse(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order.

    Raises:
        ReadmeError: a fence without a known language, an unclosed fence, a marker that is not
            right before a fence, or an unknown directive.
    """
    blocks: list[Block] = []
    heading = ""
    pending: dict[str, str] | None = None
    pending_line = 0
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            lang = fence.group(1)
            if lang not in KNOWN_LANGS:
                raise ReadmeError(f"line {i + 1}: code block language {lang!r}; use one of {', '.join(KNOWN_LANGS)}")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ReadmeError(f"line {i + 1}: code block never closed")
            blocks.append(Block(lang, "\n".join(lines[i + 1:end]) + "\n", i + 1, heading, pending or {}))
            pending = None
            i = end + 1
            continue
        marker = _MARKER.match(line)
        if marker:
            found = _directives(marker.group(1), i + 1)
            if pending is None:
                pending, pending_line = {}, i + 1
            pending.update(found)
        elif pending is not None:
            raise ReadmeError(f"line {pending_line}: readme-test marker not right before a code block")
        else:
            head = _HEADING.match(line)
            if head:
                heading = head.group(2)
        i += 1
    if pending is not None:
        raise ReadmeError(f"line {pending_line}: readme-test marker not right before a code block")
    return blocks


def sessions(blocks: list[Block]) -> dict[str, list[Block]]:
    """The blocks that run, grouped by session, sessions in order of their first block."""
    out: dict[str, list[Block]] = {}
    for block in blocks:
        if block.in_session:
            out.setdefault(block.session, []).append(block)
    return out


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_map(blocks: list[Block]) -> dict[str, int]:
    """README port (8080-8089) -> a free port, for every one the blocks name, 8080 always."""
    names = sorted({"8080", *(m for b in blocks for m in _PORT.findall(b.code + " ".join(b.directives.values())))})
    return dict(zip(names, free_ports(len(names))))


def _ported(text: str, ports: dict[str, int]) -> str:
    return _PORT.sub(lambda m: str(ports[m.group(0)]), text)


def _delimiter(code: str, word: str) -> str:
    """A here-document delimiter that does not occur in ``code``."""
    while word in code:
        word += "_"
    return word


def build_script(blocks: list[Block], ports: dict[str, int]) -> str:
    """One bash script running the blocks in order, a separator line before each block on
    stdout and stderr (the block's README line), ports rewritten."""
    out = ["set -eu -o pipefail"]
    for n, block in enumerate(blocks):
        sep = _SEPARATOR.format(n)
        out.append(f"printf '\\n%s\\n' '{sep}'; printf '\\n%s line {block.line}\\n' '{sep}' >&2")
        if "server" in block.directives:
            base = ports["8080"]
            # its log goes to the session's stderr, which is checked for tracebacks
            out.append(f"qserve serve {_ported(block.directives['server'], ports)} & readme_server=$!")
            out.append(f"until curl -s -o /dev/null http://127.0.0.1:{base}/healthz; "
                       "do kill -0 $readme_server; sleep 0.05; done")
        code = _ported(block.code, ports)
        if "file" in block.directives:
            word = _delimiter(code, "README_FILE_EOF")
            out.append(f"cat > {block.directives['file']} <<'{word}'\n{code}{word}")
        elif block.lang == "python":
            word = _delimiter(code, "README_PYTHON_EOF")
            out.append(f"python - <<'{word}'\n{code}{word}")
        else:
            out.append(code)
    out.append(f"printf '\\n%s\\n' '{_SEPARATOR.format(len(blocks))}'")
    return "\n".join(out) + "\n"


@dataclass
class SessionResult:
    returncode: int | None         # None: the deadline passed
    stdout: str
    stderr: str
    block_stdout: list[str]        # per block, as split by the separators
    reached: int                   # index of the last block that started

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.bad_stderr

    @property
    def bad_stderr(self) -> list[str]:
        """The stderr lines that fail a session whatever its exit status."""
        return [line for line in self.stderr.splitlines() if any(bad in line for bad in _BAD_STDERR)]


def _live_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not zombies (Linux /proc; else a signal probe)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            live.append(int(entry))
    return live


def _wait_for_exits(pids: list[int], deadline: float) -> None:
    """Block until every one of ``pids`` has exited or ``deadline`` (time.monotonic) passes. They
    are not our children (a session's background processes), so they cannot be waited for; a
    pidfd becomes readable when its process exits, which poll() waits on without sleeping."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                pending.discard(fd)
                poller.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)


def stop_group(pgid: int, *, grace: float = 10.0) -> list[int]:
    """SIGTERM the process group, wait (bounded) for its members to exit, SIGKILL what is left.
    Returns the pids that needed the SIGKILL."""
    stubborn: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _live_members(pgid):
            return []
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return []
        deadline = time.monotonic() + wait
        while (live := _live_members(pgid)) and time.monotonic() < deadline:
            _wait_for_exits(live, deadline)
        if sig == signal.SIGTERM:
            stubborn = _live_members(pgid)
    return stubborn


def run_session(blocks: list[Block], workdir: Path, *, timeout: float = 45.0,
                python: str = sys.executable) -> SessionResult:
    """Run the blocks in ``workdir`` as one bash script in a new process group; every process
    it leaves behind is stopped by the group before this returns."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = port_map(blocks)
    script = workdir / "readme-session.sh"
    script.write_text(build_script(blocks, ports))
    bindir = str(Path(python).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), HOME=str(workdir),
               XDG_CONFIG_HOME=str(workdir / ".config"), QSERVE_PORT=str(ports["8080"]))
    out_path, err_path = workdir / "readme-session.out", workdir / "readme-session.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(["bash", str(script)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            stop_group(proc.pid)
            proc.wait()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    parts = _SEPARATOR_RE.split(stdout)
    # parts: [before, "0", text0, "1", text1, ..., str(len(blocks)), after]
    per_block = [""] * len(blocks)
    reached = -1
    for k in range(1, len(parts) - 1, 2):
        n = int(parts[k])
        if n < len(blocks):
            per_block[n] = parts[k + 1]
            reached = max(reached, n)
    return SessionResult(returncode, stdout, stderr, per_block, reached)


def expectations(block: Block) -> list[tuple[str, re.Pattern]]:
    """The ``# -> TEXT`` lines of a block: (TEXT, the pattern its stdout must contain)."""
    out = []
    for line in block.code.splitlines():
        m = _EXPECT.match(line)
        if not m:
            continue
        text = re.split(r"\s{2,}", m.group(1).strip(), maxsplit=1)[0]
        regex = "".join(".*?" if piece == "<...>" else r"\S+?" if _PLACEHOLDER.fullmatch(piece)
                        else re.escape(piece) for piece in _PLACEHOLDER.split(text))
        out.append((text, re.compile(regex)))
    return out


def check_expectations(blocks: list[Block], result: SessionResult) -> list[str]:
    """One line per ``# -> TEXT`` whose TEXT is not in its block's stdout."""
    problems = []
    for block, stdout in zip(blocks, result.block_stdout):
        for text, pattern in expectations(block):
            if not pattern.search(stdout):
                problems.append(f"{block.where()}: output lacks {text!r}")
    return problems


def describe_failure(blocks: list[Block], result: SessionResult, tail: int = 40) -> str:
    """A failure report: which block, how it ended, and the end of its output."""
    block = blocks[result.reached] if 0 <= result.reached < len(blocks) else None
    how = "timed out" if result.returncode is None else f"exit status {result.returncode}"
    if result.bad_stderr:
        how += "; stderr: " + " | ".join(result.bad_stderr[:3])
    where = block.where() if block else "before the first block"
    err = "\n".join(result.stderr.splitlines()[-tail:])
    out = "\n".join(result.stdout.splitlines()[-tail:])
    return f"{where}: {how}\n--- stdout (end) ---\n{out}\n--- stderr (end) ---\n{err}"
