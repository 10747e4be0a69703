"""Soak (PROTOCOL: Offsets): 1,000 seeded random events on three sessions that stream output; every
reader's bytes are the PTY's, nothing lost or repeated, offsets contiguous.

The events are what a browser does: WebSocket reconnects, switches between the
WebSocket and long-polling, rejoins from an old saved offset, page reloads (a
fresh client resuming from its saved offsets), a second tab on the same
sessions, and bursts of output. Each session runs a small generator that prints
a deterministic byte sequence (text, colour escapes, multi-byte UTF-8, bytes
that are not UTF-8), so the test knows every byte the PTY carries. The clients
speak the protocol directly (conftest's Socket, HTTP), no browser.

Bounded: at most 1,000 events and EVENT_SECONDS of them; a summary line says
what ran. A failure names its seed; CODA_SOAK_SEED=<seed> replays it.
"""

import base64
import collections
import os
import random
import select
import sys
import time

from conftest import wait_for

EVENTS = 1000
EVENT_SECONDS = 150        # stop early rather than run long on a slow machine
SESSIONS = 3
MAX_CLIENTS = 4

GENERATOR = r'''
import random
import sys


def block(stream, k):
    """Block k of stream `stream`: the same bytes in the generator and in the test."""
    rng = random.Random(stream * 1_000_003 + k)
    parts = [b"\x1b[3%dm#%d:%d " % (k % 8, stream, k)]
    for _ in range(rng.randint(1, 12)):
        piece = rng.choice(["h\u00e9llo w\u00f6rld \u2713 ".encode(), "\u6f22\u5b57\U0001f642\U0001f44d\U0001f3fd ".encode(),
                            b"\xff\xfe", b"\xc0", b"\xe2\x82", b"\x1b[1;32mgreen\x1b[0m ", b"plain ascii text ",
                            bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 30)))])
        parts.append(piece * rng.randint(1, 20))
    parts.append(b"\x1b[0m\n")
    return b"".join(parts)


if __name__ == "__main__":
    stream, out = int(sys.argv[1]), sys.stdout.buffer
    out.write(b"SOAK-" + b"BEGIN\n")
    out.flush()
    for line in sys.stdin.buffer:   # each word asks for one block
        for word in line.split():
            out.write(block(stream, int(word)))
        out.flush()
'''
BEGIN = b"SOAK-BEGIN\n"
namespace = {}
exec(compile(GENERATOR, "generator", "exec"), namespace)
block = namespace["block"]


class Reader:
    """One pane's view of one session: the bytes it has from `start`, and where it reads next."""

    def __init__(self, sid, start):
        self.sid, self.start, self.position = sid, start, start
        self.data = bytearray()
        self.saved = [start]   # offsets it could have saved, to rejoin from later

    def take(self, offset, payload, how):
        assert offset == self.position, f"{how}: {self.sid} expected offset {self.position}, got {offset}"
        known = self.start + len(self.data)
        again = max(0, min(known - offset, len(payload)))   # bytes it had before a rewind: the same ones
        at = offset - self.start
        assert payload[:again] == self.data[at:at + again], f"{how}: {self.sid} different bytes at {offset}"
        self.data += payload[again:]
        self.position = offset + len(payload)

    def save(self):
        self.saved.append(self.position)


class Client:
    """One tab: readers for some sessions, over one WebSocket or over long-polling."""

    def __init__(self, server, readers, mode, rng):
        self.server, self.rng = server, rng
        self.readers = {r.sid: r for r in readers}
        self.sock, self.mode, self.joining = None, None, set()
        self.use(mode)

    def use(self, mode):
        """Connect (again) over `mode`, resuming every reader from its own offset."""
        self.close()
        self.mode = mode
        if mode == "ws":
            self.sock = self.server.websocket()
            for reader in self.readers.values():
                self.join(reader)

    def join(self, reader):
        self.sock.send(type="join_session", session_id=reader.sid, since=reader.position)
        self.joining.add(reader.sid)
        deadline = time.monotonic() + 20
        while reader.sid in self.joining:
            assert time.monotonic() < deadline, f"no 'joined' for {reader.sid}"
            self.receive_one()

    def receive_one(self):
        item = self.sock.receive(pings=True)   # the server may ping at any time: that too is a frame
        if item[0] == "ping":
            return
        if item[0] == "output":
            _, sid, offset, payload = item
            if sid not in self.joining:   # frames before 'joined' are the previous join's
                self.readers[sid].take(offset, payload, "websocket")
            return
        event = item[1]
        assert event.get("type") == "joined", f"unexpected event {event}"
        reader = self.readers[event["session_id"]]
        assert event["offset"] == reader.position and event["truncated"] is False, (event, reader.position)
        self.joining.discard(reader.sid)

    def pump(self):
        """Take what has arrived (WebSocket) or ask once without waiting (polling)."""
        if self.mode == "ws":
            for _ in range(200):
                if not select.select([self.sock.ws.sock], [], [], 0.01)[0]:
                    return
                self.receive_one()
        elif self.rng.random() < 0.1:   # a client that attaches, as a page may after a reload
            for reader in self.readers.values():
                answer = self.server.api("/api/session/attach", {"session_id": reader.sid, "since": reader.position,
                                                                 "encoding": "base64"})
                self.take_answer(reader, answer, "attach")
        else:
            since = {sid: r.position for sid, r in self.readers.items()}
            answer = self.server.api("/api/output-batch", {"session_ids": list(since), "since": since,
                                                           "wait": 0, "encoding": "base64"})
            for sid, out in answer["outputs"].items():
                self.take_answer(self.readers[sid], out, "poll")

    @staticmethod
    def take_answer(reader, answer, how):
        payload = base64.b64decode(answer["output"], validate=True)
        assert answer["truncated"] is False and answer["next_offset"] == answer["offset"] + len(payload), answer
        reader.take(answer["offset"], payload, how)

    def rewind(self, reader, offset):
        reader.position = offset
        if self.mode == "ws":
            self.join(reader)   # the same socket, joined again from the old offset

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock, self.joining = None, set()


def start_generators(server, home):
    script = home / "soak_generator.py"
    script.write_text(GENERATOR)
    sids = [server.new_session(label=f"soak-{i}") for i in range(SESSIONS)]
    for i, sid in enumerate(sids):
        server.wait_prompt(sid)
        # Raw mode: the bytes reach the stream untranslated; -echo: the requests are not echoed.
        server.type(sid, f"stty raw -echo; exec {sys.executable} {script} {i}\r")
    for sid in sids:
        wait_for(lambda: BEGIN in attach_bytes(server, sid), timeout=20, what="the generator to start")
    return sids


def attach_bytes(server, sid):
    answer = server.api("/api/session/attach", {"session_id": sid, "since": 0, "encoding": "base64"})
    assert answer["offset"] == 0 and answer["truncated"] is False
    return base64.b64decode(answer["output"])


def run_events(server, sids, rng, counts):
    blocks = {sid: 0 for sid in sids}   # blocks asked of each generator so far
    clients = [Client(server, [Reader(sid, 0) for sid in sids], "ws", rng)]
    retired = []                        # readers of closed tabs, checked at the end too
    deadline = time.monotonic() + EVENT_SECONDS
    kinds = ["burst"] * 7 + ["reconnect", "reconnect", "switch", "switch", "rewind", "rewind",
                             "reload", "second_tab", "idle", "idle"]
    for _ in range(EVENTS):
        if time.monotonic() > deadline:
            break
        kind = rng.choice(kinds)
        client = rng.choice(clients)
        if kind == "burst":
            sid = rng.choice(sids)
            n = rng.choice([1, 1, 2, 3, 5, 60])   # now and then more than a 64 KiB frame
            server.type(sid, " ".join(str(k) for k in range(blocks[sid], blocks[sid] + n)) + "\n")
            blocks[sid] += n
        elif kind == "reconnect" and client.mode == "ws":
            client.use("ws")
        elif kind == "switch":
            client.use("poll" if client.mode == "ws" else "ws")
        elif kind == "rewind":
            reader = rng.choice(list(client.readers.values()))
            client.rewind(reader, rng.choice(reader.saved))
        elif kind == "reload":   # a fresh page, resuming from the offsets the old one saved
            client.close()
            clients.remove(client)
            retired += client.readers.values()
            readers = [Reader(r.sid, r.position) for r in client.readers.values()]
            clients.append(Client(server, readers, rng.choice(["ws", "poll"]), rng))
        elif kind == "second_tab" and len(clients) < MAX_CLIENTS:
            chosen = rng.sample(sids, rng.randint(1, len(sids)))
            readers = [Reader(sid, rng.choice([0, client.readers[sid].position if sid in client.readers else 0]))
                       for sid in chosen]
            clients.append(Client(server, readers, rng.choice(["ws", "poll"]), rng))
        elif kind == "second_tab" and len(clients) > 1:   # enough tabs: close one
            client.close()
            clients.remove(client)
            retired += client.readers.values()
        else:
            kind = "idle"
        counts[kind] += 1
        for each in clients:
            each.pump()
            for reader in each.readers.values():
                reader.save()
    return blocks, clients, retired


def test_every_reader_gets_the_pty_bytes_through_reconnects_switches_rejoins_and_reloads(start_coda, tmp_path):
    seed = int(os.environ.get("CODA_SOAK_SEED") or random.randrange(1 << 32))
    print(f"soak seed {seed} (CODA_SOAK_SEED={seed} replays it)")
    rng = random.Random(seed)
    server = start_coda({"CI": "true", "CODA_SCROLLBACK_BYTES": str(16 * 1024 * 1024)})
    counts = collections.Counter()
    started = time.monotonic()
    try:
        sids = start_generators(server, tmp_path)
        blocks, clients, retired = run_events(server, sids, rng, counts)
        expected = {sid: b"".join(block(i, k) for k in range(blocks[sid])) for i, sid in enumerate(sids)}

        def all_printed():
            for client in clients:   # tabs keep reading: a joined socket nobody reads pauses its PTY (paced by TCP)
                client.pump()
            kept = {sid: attach_bytes(server, sid) for sid in sids}
            return kept if all(kept[s].endswith(expected[s]) for s in sids) else None

        final = wait_for(all_printed, timeout=60, step=0.2, what="every block printed")
        for sid in sids:
            assert final[sid][final[sid].index(BEGIN) + len(BEGIN):] == expected[sid]

        def caught_up():
            for client in clients:
                client.pump()
            return all(r.position == len(final[r.sid]) for c in clients for r in c.readers.values())

        wait_for(caught_up, timeout=60, step=0.01, what="every reader at the end of its stream")
        readers = retired + [r for c in clients for r in c.readers.values()]
        for reader in readers:
            assert bytes(reader.data) == final[reader.sid][reader.start:reader.start + len(reader.data)], reader.sid
    except Exception as error:   # assertions, and also a socket or decoding failure
        raise AssertionError(f"soak seed {seed}: {error!r}") from error
    total = sum(len(final[s]) for s in sids)
    print(f"soak: seed {seed}, {sum(counts.values())} events ({dict(sorted(counts.items()))}), "
          f"{len(sids)} sessions, {sum(blocks.values())} blocks, {total} bytes, {len(readers)} readers, "
          f"{time.monotonic() - started:.0f} s")
