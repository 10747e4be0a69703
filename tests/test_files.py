"""Files out (issue 13): /api/files lists and /api/download streams files under ~/projects and
~/uploads only, behind the same access checks as every route, with the path confined to its root."""

import os
import sys
import urllib.parse
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Coda


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("files-home")
    (home / "projects" / "app" / "src").mkdir(parents=True)
    (home / "projects" / "app" / "src" / "main.py").write_text("print('hi')\n")
    (home / "projects" / "app" / "data.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, every byte value
    (home / "projects" / "app" / "r\u00e9sum\u00e9 \"final\";.txt").write_text("accents\n")
    (home / "uploads").mkdir()
    (home / "uploads" / "shot.png").write_bytes(b"\x89PNG fake")
    (home / "secret.txt").write_text("TOP SECRET\n")
    os.symlink(home / "secret.txt", home / "projects" / "escape.txt")  # a symlink out of the root
    os.symlink(home, home / "projects" / "home-link")                 # a folder symlink out of it
    os.symlink(home / "projects" / "app" / "src" / "main.py", home / "projects" / "inside.py")  # stays inside
    os.mkfifo(home / "projects" / "pipe")
    coda = Coda(home)
    yield coda
    coda.stop()


def get(server, endpoint, path, **kw):
    return server.get(f"{endpoint}?path={urllib.parse.quote(path, safe='/')}", **kw)


def test_the_roots_and_a_folder_are_listed(server):
    roots = server.get("/api/files").json()
    assert [e["name"] for e in roots["entries"]] == ["projects", "uploads"]
    listing = get(server, "/api/files", "projects/app").json()
    assert listing["path"] == "projects/app" and not listing["truncated"]
    by_name = {e["name"]: e for e in listing["entries"]}
    assert by_name["src"]["type"] == "dir" and listing["entries"][0]["name"] == "src"  # folders first
    assert by_name["data.bin"] == {**by_name["data.bin"], "type": "file", "size": 1024 * 1024}


def test_a_file_downloads_exactly_as_an_attachment(server):
    answer = get(server, "/api/download", "projects/app/data.bin", stream=True)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.headers["Content-Disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    assert answer.headers["Content-Length"] == str(1024 * 1024)
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.raw.read() == bytes(range(256)) * 4096
    assert get(server, "/api/download", "uploads/shot.png").content == b"\x89PNG fake"
    assert get(server, "/api/download", "projects/inside.py").text == "print('hi')\n"  # a symlink that stays inside


def test_an_awkward_name_gets_a_safe_header(server):
    answer = get(server, "/api/download", "projects/app/r\u00e9sum\u00e9 \"final\";.txt")
    assert answer.status_code == 200 and answer.text == "accents\n"
    disposition = answer.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="r_sum_final_.txt"; filename*=UTF-8\'\'')
    assert urllib.parse.unquote(disposition.split("''", 1)[1]) == "r\u00e9sum\u00e9 \"final\";.txt"


@pytest.mark.parametrize("path,status", [
    ("projects/../secret.txt", 400),          # ..
    ("projects/app/../../secret.txt", 400),
    ("/etc/passwd", 400),                     # absolute
    ("projects/app/\x00main.py", 400),        # NUL
    ("projects/" + "a" * 300, 400),           # a name longer than any file system allows
    ("projects/" + "a/" * 3000, 400),         # a path longer than MAX_FILE_PATH
    ("secret.txt", 403),                      # not under a root
    (".ssh/id_rsa", 403),
    ("projects/escape.txt", 403),             # a symlink out of the root
    ("projects/home-link/secret.txt", 403),   # through a folder symlink out of it
    ("projects/nothing-here", 404),
    ("projects/app", 400),                    # a folder is not a file
    ("projects/pipe", 400),                   # nor is a FIFO (and opening it does not hang)
])
def test_paths_outside_the_roots_are_refused_with_a_json_error(server, path, status):
    answer = get(server, "/api/download", path)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"].endswith(".")
    assert "TOP SECRET" not in answer.text


def test_listing_is_confined_too(server):
    for path in ("projects/home-link", "projects/..", "..", "/", ".ssh"):
        answer = get(server, "/api/files", path)
        assert answer.status_code in (400, 403), (path, answer.status_code)
        assert "secret.txt" not in answer.text


def test_bad_encoding_and_repeated_paths_are_refused(server):
    assert server.get("/api/download?path=projects/%ff").status_code == 400
    assert server.get("/api/download?path=projects/a&path=uploads/b").status_code == 400


def test_files_need_access(server):
    for endpoint in ("/api/files?path=projects", "/api/download?path=projects/app/src/main.py"):
        answer = requests.get(server.url + endpoint, timeout=10)
        assert answer.status_code == 403 and "print" not in answer.text


SEGMENTS = ["projects", "uploads", "app", "src", "main.py", "..", ".", "", "escape.txt", "home-link", "secret.txt",
            "pipe", "%2e%2e", "\x00", "\\", "~", "/", "a" * 256]


def test_any_path_gets_a_file_inside_the_roots_or_a_json_error(server):
    """Paths made of the pieces of every attack above, in any order: never a 500, never a byte from outside."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.sampled_from(SEGMENTS) | st.text(max_size=8), max_size=6), st.booleans(), st.booleans())
    def check(parts, absolute, listing):
        path = ("/" if absolute else "") + "/".join(parts)
        answer = get(server, "/api/files" if listing else "/api/download", path, timeout=10)
        assert answer.status_code in (200, 400, 403, 404), (path, answer.status_code)
        assert "TOP SECRET" not in answer.text and "secret.txt" not in answer.text.replace(path, "")
        if answer.status_code != 200:
            assert answer.headers["Content-Type"] == "application/json" and answer.json()["error"]

    check()


# ---- `coda.py download FILE` in a terminal: an offer the page shows as a link -------------------

from test_notify import run_and_collect  # noqa: E402
from test_browser import Tab, browser, wait, wait_ready  # noqa: E402,F401


def offers(notices):
    return [n["body"] for n in notices if n["kind"] == "download"]


def test_the_download_command_offers_only_files_under_the_roots(server):
    sid = server.new_session()
    try:
        offset = server.wait_prompt(sid)
        coda = f"{sys.executable} {ROOT / 'coda.py'}"
        notices, offset = run_and_collect(server, sid, offset, f"cd ~/projects/app && {coda} download src/main.py")
        assert offers(notices) == ["projects/app/src/main.py"]
        notices, offset = run_and_collect(server, sid, offset, f"{coda} download ~/secret.txt ../escape.txt; echo rc=$?")
        assert offers(notices) == []
        assert server.read_until(sid, "rc=1", since=offset - 400)[0].count("only files under ~/projects") == 2
        # Output that forges the sequence offers nothing outside the roots' shape ...
        notices, offset = run_and_collect(server, sid, offset,
                                          r"printf '\033]777;coda-download;projects/../secret.txt\007'; "
                                          r"printf '\033]777;coda-download;/etc/passwd\007'; "
                                          r"printf '\033]777;coda-download;secret.txt\007'")
        assert offers(notices) == []
        # ... and what it can offer, /api/download still confines (a symlink out is refused).
        notices, offset = run_and_collect(server, sid, offset, r"printf '\033]777;coda-download;projects/escape.txt\007'")
        assert offers(notices) == ["projects/escape.txt"]
        assert get(server, "/api/download", "projects/escape.txt").status_code == 403
    finally:
        server.close_session(sid)


def test_the_page_shows_an_offer_as_a_link_to_click(browser, server):
    tab = Tab(browser, server)
    try:
        page = tab.open()
        wait_ready(page)
        sid = page.evaluate("window.coda.tabs[0].sessions[0]")
        server.type(sid, f"{sys.executable} {ROOT / 'coda.py'} download ~/uploads/shot.png\r")
        link = page.locator(".download-offer a")
        link.wait_for()
        assert link.inner_text() == "Download shot.png"
        with page.expect_download() as info:
            link.click()
        assert Path(info.value.path()).read_bytes() == b"\x89PNG fake"
        wait(page, "() => !document.querySelector('.download-offer')", what="the offer gone once taken")
    finally:
        tab.close()
    assert not tab.problems, tab.problems
