"""Runs the README's shell examples, in order and as written, against a live `make run`.

Every ```sh / ```bash block that talks to the server (it names http://127.0.0.1:8000 or
ws://127.0.0.1:8000) runs in bash from the project folder, with `set -eo pipefail`; variables a
block sets (TOKEN...) carry over to the next. The only change made to the text is the server's
address when ``--url`` names another one. Blocks that do not talk to the server (make, benchmarks,
the interactive createsuperuser) are listed as skipped.

Every curl call's HTTP status is recorded. A 4xx or 5xx fails the check unless the README expects
it: a ``# -> 404`` comment on the command, or in the comment lines right above it (``# -> 404 or
503`` for several). A marked command that answers something else fails too. A block that says it
runs ``until you press Ctrl-C`` (it follows a stream forever) runs for ``--follow`` seconds, must
still be running and have printed something, and then gets SIGINT as Ctrl-C would send it.

Standard library only. `make readme-check` runs it against a running `make run`; the smoke test
runs it against its fresh clone (.ci/run).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8000"
README_HOST = "127.0.0.1:8000"
SERVER_MENTION = re.compile(r"(?:http|ws)://127\.0\.0\.1:8000\b")
EXPECT = re.compile(r"#\s*->\s*(\d{3}(?:\s*(?:,|or)\s*\d{3})*)")
FOLLOWS = re.compile(r"#.*until you press Ctrl-C", re.IGNORECASE)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_]\w*)\1")
ASSIGNS = re.compile(r"^\s*(?:export\s+([A-Za-z_]\w*)\s*$|(?:export\s+)?([A-Za-z_]\w*)=)", re.M)
BLOCK_TIMEOUT = 120

# A curl that records each call's final status and URL (never the headers: they hold the token).
PRELUDE = r"""
set -eo pipefail
[ -f "$README_CHECK_STATE" ] && . "$README_CHECK_STATE"
curl() {
  local headers rc=0 url="" arg
  headers=$(mktemp)
  command curl -D "$headers" "$@" | tee -a "$README_CHECK_CURL_OUT" || rc=$?
  for arg in "$@"; do case $arg in http://*|https://*) url=$arg;; esac; done
  printf '%s\t%s\n' "$(grep -a '^HTTP/' "$headers" | tail -n 1 | cut -d' ' -f2)" "$url" >> "$README_CHECK_CURL_LOG"
  rm -f "$headers"
  return $rc
}
"""


@dataclass
class Command:
    line: int  # in the README
    text: str
    expect: set[int] = field(default_factory=set)

    @property
    def calls_curl(self) -> bool:
        return bool(re.search(r"(^|[\s$(;|&])curl\s", self.text))


@dataclass
class Block:
    line: int
    section: str
    text: str
    commands: list[Command]

    @property
    def talks_to_server(self) -> bool:
        return bool(SERVER_MENTION.search(self.text))

    @property
    def follows(self) -> bool:
        return bool(FOLLOWS.search(self.text))


def parse_commands(text: str, first_line: int) -> list[Command]:
    """Split a block into commands (continuation lines, open quotes and heredocs joined), with the
    statuses each is marked to expect."""
    lines = text.split("\n")
    commands: list[Command] = []
    pending: set[int] = set()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped:
            pending = set()
            i += 1
            continue
        if stripped.startswith("#"):
            pending |= _expected(stripped)
            i += 1
            continue
        start, chunk = i, [lines[i]]
        while _incomplete("\n".join(chunk)) and i + 1 < len(lines):
            i += 1
            chunk.append(lines[i])
        heredoc = HEREDOC.search("\n".join(chunk))
        if heredoc:
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(2):
                i += 1
                chunk.append(lines[i])
        command_text = "\n".join(chunk)
        # A trailing comment may mark the command too (the heredoc's body is not searched).
        head = command_text if not heredoc else command_text[: heredoc.end()]
        commands.append(Command(first_line + start, command_text, pending | _expected(head)))
        pending = set()
        i += 1
    return commands


def _expected(text: str) -> set[int]:
    return {int(code) for match in EXPECT.finditer(text) for code in re.findall(r"\d{3}", match.group(1))}


def _incomplete(text: str) -> bool:
    if text.rstrip().endswith("\\"):
        return True
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: a multi-line JSON body
        return True
    return False


def parse_readme(path: Path) -> list[Block]:
    blocks, section = [], ""
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        fence = re.match(r"^```(sh|bash)\s*$", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            text = "\n".join(lines[i + 1 : end])
            blocks.append(Block(i + 2, section, text, parse_commands(text, i + 2)))
            i = end
        i += 1
    return blocks


def run_block(block: Block, script: str, env: dict[str, str], root: Path, follow: float) -> str | None:
    """Run one block; the reason it failed, or None."""
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if block.follows:
        try:
            output, _ = process.communicate(timeout=follow)
            return f"it should follow its stream until Ctrl-C but exited with {process.returncode}:\n{output}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                output, _ = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
                return f"Ctrl-C (SIGINT) did not stop it:\n{output}"
        print(_indent(output))
        if not _without(output, Path(env["README_CHECK_CURL_OUT"]).read_text()).strip():
            return "it printed nothing (besides its curl calls) while it ran"
        return None
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return f"it ran longer than {BLOCK_TIMEOUT} s:\n{output}"
    print(_indent(output))
    if process.returncode != 0:
        return f"it exited with status {process.returncode}"
    return None


def _without(output: str, printed_by_curl: str) -> str:
    """What a block printed besides what its curl calls printed."""
    return output.replace(printed_by_curl, "", 1)


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.rstrip().splitlines())


def check(readme: Path, root: Path, url: str, follow: float) -> list[str]:
    failures: list[str] = []
    blocks = parse_readme(readme)
    host = url.split("//", 1)[1]
    assigned: list[str] = []
    with tempfile.TemporaryDirectory(prefix="readme-check-") as tmp:
        state, curl_log, curl_out = Path(tmp) / "state.sh", Path(tmp) / "curl.log", Path(tmp) / "curl.out"
        env = dict(
            os.environ,
            README_CHECK_STATE=str(state),
            README_CHECK_CURL_LOG=str(curl_log),
            README_CHECK_CURL_OUT=str(curl_out),
        )
        ran = 0
        for block in blocks:
            where = f"README line {block.line} ({block.section})"
            if not block.talks_to_server:
                print(f"-- {where}: skipped (does not talk to the server)")
                continue
            ran += 1
            print(f"-- {where}: running" + (f", for {follow:.0f} s then Ctrl-C" if block.follows else ""))
            text = SERVER_MENTION.sub(lambda m: m.group(0).replace(README_HOST, host), block.text)
            for names in ASSIGNS.findall(block.text):
                assigned += [name for name in names if name and name not in assigned]
            save = (
                f'\n{{ declare -p {" ".join(assigned)} 2>/dev/null || true; }} > "$README_CHECK_STATE"\n'
                if assigned
                else ""
            )
            curl_log.write_text("")
            curl_out.write_text("")
            problem = run_block(block, PRELUDE + text + "\n" + save, env, root, follow)
            if problem:
                failures.append(f"{where}: {problem}")
            calls = [line.split("\t", 1) for line in curl_log.read_text().splitlines()]
            expected = [c for c in block.commands if c.calls_curl]
            for n, (status, called) in enumerate(calls):
                command = expected[n] if n < len(expected) else None
                line = command.line if command else block.line
                marked = command.expect if command else set()
                print(f"   {status or '---'} {called}" + (f"   (expected: {sorted(marked)})" if marked else ""))
                code = int(status) if status.isdigit() else 0
                if marked and code not in marked:
                    failures.append(f"README line {line}: {called} answered {status}, the README says {sorted(marked)}")
                elif not marked and not 200 <= code < 400:
                    failures.append(
                        f"README line {line}: {called} answered {status or 'nothing'}; mark it `# -> {status}` "
                        "if the README means it to fail"
                    )
            if not problem and len(calls) != len(expected):
                failures.append(f"{where}: {len(expected)} curl commands in the text but {len(calls)} calls ran")
        if ran == 0:
            failures.append("no README example talks to the server: nothing was checked")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=README_URL, help="the live server (default: the README's)")
    parser.add_argument("--readme", default=str(BASE / "README.md"))
    parser.add_argument("--root", default=str(BASE), help="folder the examples run in (has .venv and manage.py)")
    parser.add_argument("--follow", type=float, default=8.0, help="seconds a follow-forever example runs")
    args = parser.parse_args()
    failures = check(Path(args.readme), Path(args.root), args.url.rstrip("/"), args.follow)
    for failure in failures:
        print(f"readme-check: FAILED: {failure}", file=sys.stderr)
    print("readme-check: OK" if not failures else f"readme-check: {len(failures)} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
