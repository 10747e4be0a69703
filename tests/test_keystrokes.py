"""Sharing the one event loop with a session being typed into (coda.Keystrokes, Session._pump):
in isolation, on a real PTY. The figures this buys are tests/bench.py's echo_under_flood."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import coda  # noqa: E402  (imported, not run: no monkey patching, no server)


def test_only_another_session_being_typed_into_is_given_way_to(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(coda.time, "monotonic", lambda: clock[0])
    keystrokes = coda.Keystrokes()
    assert keystrokes.urgent_fds("a") == () and keystrokes.seconds_left("a") == 0

    keystrokes.typed("typed", (7, 9))
    assert keystrokes.urgent_fds("flood") == (7, 9)
    assert keystrokes.seconds_left("flood") == coda.TYPING_SECONDS
    assert keystrokes.urgent_fds("typed") == () and keystrokes.seconds_left("typed") == 0  # never itself

    clock[0] += coda.TYPING_SECONDS / 2
    assert keystrokes.urgent_fds("flood") == (7, 9)
    clock[0] += coda.TYPING_SECONDS / 2
    assert keystrokes.urgent_fds("flood") == () and keystrokes.seconds_left("flood") == 0  # typing stopped


@pytest.fixture
def flooding_pty():
    """A PTY master with 300 000 bytes of `x` coming, and the bytes expected."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    attrs = coda.termios.tcgetattr(slave)
    attrs[1] &= ~coda.termios.OPOST  # bytes as written: no \n -> \r\n to count
    attrs[3] &= ~(coda.termios.ECHO | coda.termios.ICANON)
    coda.termios.tcsetattr(slave, coda.termios.TCSANOW, attrs)
    writer = subprocess.Popen(["python3", "-c", "import os; os.write(1, b'x' * 300000)"], stdout=slave)
    os.close(slave)
    yield master, 300000
    writer.kill()
    writer.wait()
    os.close(master)


def gather(pty, urgent_fds):
    """Turns of the reader until the writer's bytes are all in: each turn's bytes, in order."""
    turns, total, deadline = [], 0, coda.time.monotonic() + 20
    while total < 300000 and coda.time.monotonic() < deadline:
        data, ended = coda.Session._read_available(pty, urgent_fds)
        if data:
            turns.append(data)
            total += len(data)
        if ended:
            break
        if not data:
            coda._real_select([pty.fd], [], [], 0.5)
    return turns


@pytest.fixture
def reads(monkeypatch):
    """Every os.read that returned bytes."""
    done, real_read = [], os.read

    def counting_read(fd, n):
        data = real_read(fd, n)
        done.append(len(data))
        return data
    monkeypatch.setattr(coda.os, "read", counting_read)
    return done


def test_a_readers_turn_ends_after_one_read_once_the_typed_session_has_something(flooding_pty, reads):
    """The typed session's PTY (here a pipe holding its answer) is readable: a flood's turn
    stops after its first read instead of gathering READ_SIZE, and nothing is lost or
    reordered across the shorter turns."""
    master, expected = flooding_pty
    answer_r, answer_w = os.pipe()
    os.write(answer_w, b"e")  # the echo, waiting to be read
    turns = gather(types.SimpleNamespace(fd=master), (answer_r,))
    assert b"".join(turns) == b"x" * expected
    assert len(reads) == len(turns)  # one read per turn: the next turn comes after every other ready one
    os.close(answer_r)
    os.close(answer_w)


def test_with_nobody_typing_a_turn_gathers_many_reads(flooding_pty, reads):
    master, expected = flooding_pty
    answer_r, answer_w = os.pipe()  # nothing in it: the typed session has nothing to say
    turns = gather(types.SimpleNamespace(fd=master), (answer_r,))
    assert b"".join(turns) == b"x" * expected
    assert len(reads) > len(turns) and max(map(len, turns)) > 8192  # turns of several 4 KiB reads
    os.close(answer_r)
    os.close(answer_w)


def test_a_closed_descriptor_is_simply_not_readable():
    """The typed session may close, or its socket go, while a flood still checks them."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert coda._readable_now((r,)) is False
    assert coda._readable_now((-1,)) is False
