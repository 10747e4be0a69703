"""The output stream in isolation: offsets, truncation and UTF-8-safe slices (PROTOCOL: Offsets)."""

import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import coda  # noqa: E402  (imported, not run: no monkey patching, no server)

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


def chunked(data, cuts):
    """Split bytes at the given relative positions (anywhere, mid-character included)."""
    points = sorted({int(c * len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=12), st.lists(st.floats(0, 1), max_size=10),
       st.integers(1, 50), st.booleans())
def test_appends_and_reads_never_split_a_character_and_concatenate_back(pieces, cuts, read_size, close_at_end):
    text = "".join(pieces)
    data = text.encode()
    stream = coda.Stream(limit=1 << 20)
    received, offset = [], 0
    for part in chunked(data, cuts):
        stream.append(part)
        while True:  # a reader taking small slices between appends
            out, start, next_offset, truncated = stream.read_text(offset, read_size)
            assert not truncated and start == offset
            assert next_offset >= offset
            received.append(out)
            if next_offset == offset:
                break
            offset = next_offset
    if close_at_end:
        stream.close()
    rest, start, next_offset, _ = stream.read_text(offset, len(data) + 8)
    received.append(rest)
    assert "\ufffd" not in "".join(received)
    assert "".join(received) == text
    assert next_offset == len(data) == stream.end


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(0, 400))
def test_a_since_inside_a_character_starts_at_the_next_boundary(text, since):
    data = text.encode()
    stream = coda.Stream(limit=1 << 20)
    stream.append(data)
    since = min(since, len(data))
    out, offset, next_offset, _ = stream.read_text(since)
    assert offset >= since and offset - since <= 3
    assert data[offset:next_offset].decode() == out
    assert next_offset == len(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=40), st.integers(1024, 8192))
def test_the_ring_keeps_exactly_the_last_limit_bytes(parts, limit):
    stream = coda.Stream(limit=limit)
    whole = b"".join(parts)
    for part in parts:
        stream.append(part)
    start, kept, truncated = stream.read(0, len(whole))
    assert stream.end == len(whole)
    assert kept == whole[-limit:] and start == max(0, len(whole) - limit)
    assert truncated == (len(whole) > limit)
    # Any offset inside the kept range reads the same bytes as the source.
    middle = max(start, len(whole) - limit // 2)
    assert stream.read(middle, 100)[1] == whole[middle:middle + 100]


def test_invalid_bytes_become_replacement_characters():
    stream = coda.Stream(limit=1024)
    stream.append(b"ok \xff\xfe done")
    assert stream.read_text(0)[0] == "ok \ufffd\ufffd done"


def test_an_incomplete_tail_waits_for_its_last_bytes():
    stream = coda.Stream(limit=1024)
    smile = "🙂".encode()
    stream.append(b"a" + smile[:2])
    out, _, next_offset, _ = stream.read_text(0)
    assert out == "a" and next_offset == 1
    stream.append(smile[2:])
    assert stream.read_text(next_offset)[0] == "🙂"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20), st.integers(0, 6000),
       st.integers(1, 700))
def test_base64_slices_are_the_exact_bytes_from_any_offset(parts, since, read_size):
    """Invalid UTF-8 and a `since` inside a character included: no boundary adjustment."""
    import base64

    whole = b"".join(parts)
    stream = coda.Stream(limit=1 << 20)
    for part in parts:
        stream.append(part)
    since = min(since, len(whole))
    received, offset = b"", since
    while offset < len(whole):
        output, start, next_offset, truncated = stream.read_base64(offset, read_size)
        data = base64.b64decode(output, validate=True)
        assert start == offset and next_offset == offset + len(data) and not truncated
        assert 0 < len(data) <= read_size
        received += data
        offset = next_offset
    assert received == whole[since:]
