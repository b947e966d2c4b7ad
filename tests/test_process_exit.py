"""A command ends at once when it is done (`errors.run_as_command`), without losing anything:
its exit code, its buffered output, its exit handlers and the threads still at work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def command(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`body` as the main() of a command run by run_as_command, in a fresh interpreter whose
    stdout is a pipe (block-buffered, as under a scheduler or in CI)."""
    script = textwrap.dedent(
        """
        import atexit, sys, threading, time
        from pathlib import Path
        from ml_infer.errors import run_as_command
        out = Path(sys.argv[1])

        def main():
        {body}

        run_as_command(main)
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("ending", "code"),
    [("return", 0), ("sys.exit(2)", 2), ("sys.exit(130)", 130), ("sys.exit(None)", 0)],
)
def test_the_exit_code_and_buffered_output_survive(ending, code, tmp_path):
    result = command(
        f"""
        print("x" * 100_000)  # more than a pipe's buffer holds, still buffered at the end
        atexit.register(lambda: (out / "handler_ran").write_text("yes"))
        {ending}
        """,
        tmp_path,
    )
    assert result.returncode == code, result.stderr
    assert result.stdout == "x" * 100_000 + "\n"
    assert (tmp_path / "handler_ran").read_text() == "yes"


def test_a_message_exit_is_printed_and_is_code_1(tmp_path):
    result = command('sys.exit("error: the message")', tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: the message"


def test_a_thread_still_at_work_is_waited_for(tmp_path):
    result = command(
        """
        def work():
            time.sleep(1.0)
            (out / "thread_done").write_text("yes")

        threading.Thread(target=work).start()
        sys.exit(3)
        """,
        tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "thread_done").read_text() == "yes"


def test_a_traceback_ends_as_python_ends(tmp_path):
    result = command('raise RuntimeError("a bug")', tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
