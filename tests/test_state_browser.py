"""Restart-proof work in the page (issue 14): after a restart onto an empty disk and the token
pasted in the page, the saved tabs reopen in their folders, and the tab that ran an agent
offers that agent's own resume command, which runs only when asked."""

import json
import os
import shutil

import pytest
import requests

from conftest import free_port, wait_for
from fake_workspace import FakeWorkspace
from test_state import make_repository
from test_browser import CHROMIUM, Tab, wait, wait_ready, wait_text

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
playwright_api = pytest.importorskip("playwright.sync_api")

# Stands in for Claude Code: what the sessions' foreground look sees, and what the resume runs.
FAKE_CLAUDE = '#!/bin/sh\necho "FAKE-CLAUDE $*"\nsleep 600\n'


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"])
        yield chromium
        chromium.close()


def open_page(browser, start_coda, workspace, home, bin_folder):
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "CODA_PROXY_PORT": str(free_port()), "DATABRICKS_APP_NAME": workspace.app_name,
           "DATABRICKS_CLIENT_ID": workspace.client_id, "DATABRICKS_CLIENT_SECRET": workspace.client_secret,
           "CODA_TOKEN": None, "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "", "CODA_STATE_INTERVAL": "3600",
           "PATH": f"{bin_folder}:{os.environ['PATH']}"}
    server = start_coda(env, args=("--host", "127.0.0.1"), home=home)
    as_owner = {"X-Forwarded-Email": workspace.app_creator}
    wait_for(lambda: requests.get(server.url + "/api/version", headers=as_owner).status_code == 200,
             timeout=40, what="the owner")
    server.headers_for_owner = as_owner
    tab, page = owner_page(browser, server)
    wait_ready(page)
    return server, tab, page


def owner_page(browser, server):
    """The page as the Apps owner sees it, in a browser context of its own."""
    tab = Tab(browser, server, http_errors_expected=True, extra_http_headers=server.headers_for_owner)
    page = tab.context.new_page()
    page.on("pageerror", lambda err: tab.problems.append(f"page error: {err}"))
    tab.pages.append(page)
    page.goto(server.url + "/")
    return tab, page


def paste_token(page, workspace):
    card = page.locator(".pat-card")
    card.wait_for()
    card.locator("input").click()
    page.keyboard.insert_text(workspace.add_token(comment="pasted in the page"))
    card.locator("button").click()


def test_the_page_reopens_the_saved_tabs_and_offers_to_resume_the_agent(browser, start_coda, tmp_path):
    workspace = FakeWorkspace().start()
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "claude").write_text(FAKE_CLAUDE)
    (bin_folder / "claude").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    make_repository(home)  # ~/projects/work, with a folder src: repositories come back, with their folders
    try:
        server, tab, page = open_page(browser, start_coda, workspace, home, bin_folder)
        try:
            paste_token(page, workspace)
            wait(page, "() => document.querySelector('.pat-message').textContent.startsWith('Connected')",
                 timeout=60, what="the token connected")
            page.locator(".pat-card").wait_for(state="detached")
            page.locator(".xterm").first.click()
            page.keyboard.type("cd ~/projects/work && claude\n")
            wait_text(page, "FAKE-CLAUDE")
            page.keyboard.press("Alt+Shift+T")
            wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs[1].sessions[0]", what="a second tab")
            wait_text(page, "@", tab=1, timeout=15)
            page.keyboard.type("cd ~/projects/work/src\n")

            def layout_seen():
                layout = json.loads((home / ".coda" / "state-layout.json").read_text())
                panes = [p for t in layout["tabs"] for p in t["panes"]]
                return [(p["cwd"], p["agent"]) for p in panes] == [("projects/work", "claude"),
                                                                   ("projects/work/src", None)]
            wait_for(layout_seen, timeout=20, step=0.5, what="both tabs' folders and the agent in the layout")
        finally:
            tab.close()
            server.stop()  # SIGTERM: the last save
        assert "state saved before exiting" in server.log(), server.log()[-2000:]
        assert not tab.problems, tab.problems

        shutil.rmtree(home)
        home.mkdir()
        server, tab, page = open_page(browser, start_coda, workspace, home, bin_folder)
        try:
            paste_token(page, workspace)
            wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs.every((t) => t.sessions[0])",
                 timeout=60, what="the two saved tabs reopened")
            names = page.evaluate("window.coda.tabs.map((t) => t.name)")
            assert names == ["Shell 1", "Shell 2"], names
            # The tab shown before the restart is shown again: it ran no agent, so it offers nothing.
            wait_text(page, "@", tab=1, timeout=15)
            page.keyboard.type("pwd\n")
            wait_text(page, f"{home}/projects/work/src\n", tab=1, timeout=15)
            page.locator(".tab").first.click()
            resume = page.locator(".resume-card")
            resume.wait_for()
            assert resume.count() == 1 and "Claude Code" in resume.inner_text()
            assert "FAKE-CLAUDE" not in page.evaluate("window.coda.paneText(0, 0)")  # nothing runs unasked
            resume.locator("button", has_text="Resume: claude --continue").click()
            wait_text(page, "FAKE-CLAUDE --continue", tab=0, timeout=15)

            # A browser that has not reopened the work yet does so as it loads, and the session its
            # page asked for before it knew (static/early.js) is closed unused.
            other, again = owner_page(browser, server)
            try:
                wait(again, "() => window.coda && window.coda.tabs.length === 2 && "
                            "window.coda.tabs.every((t) => t.sessions[0])", timeout=60, what="the tabs reopened again")
                shown = {s for p in (page, again) for t in p.evaluate("window.coda.tabs") for s in t["sessions"]}

                def live():
                    answer = requests.get(server.url + "/api/sessions", headers=server.headers_for_owner, timeout=10)
                    return {s["session_id"] for s in answer.json()}
                wait_for(lambda: live() == shown, timeout=10, what=f"only the {len(shown)} sessions shown")
            finally:
                other.close()
            assert not other.problems, other.problems
        finally:
            tab.close()
            server.stop()
        assert not tab.problems, tab.problems
    finally:
        workspace.stop()
