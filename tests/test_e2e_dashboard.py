"""The whole product through a browser: form, records page, SMTP, tracking, stats.

``python -m sequencer run`` serves the dashboard (with its scheduler and the
tracking routes) on a free port, sending through a real aiosmtpd server.
Headless Chromium creates a sequence with the form, lowers a product's
quantity on the records page, opens the message that arrives and clicks its
link, then reads one open and one click on the Statistics and Emailing pages.
Screenshots of every page go to ``artifacts/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtp_server import SMTPSink, free_port

from sequencer import config, db, entities, records
from sequencer.system import CONTACT, CONTACT_LIST, SENDER

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RECIPIENT = "camille@example.com"
STARTUP_SECONDS = 60
WAIT_MS = 60_000
GRID_ROW = 35
"""Height of a header or row of Streamlit's data grid, in CSS pixels."""


def _wait_http(url: str, process: subprocess.Popen, log: Path) -> None:
    """Wait until the server answers; fail with its log if it died."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the server did not start:\n{log.read_text()[-4000:]}")


def _seed(url: str) -> None:
    """A database built by ``python -m sequencer init``, as a new user's is,
    with what an admin sets up first."""
    subprocess.run(
        [sys.executable, "-m", "sequencer", "init"],
        cwd=ROOT,
        env={**os.environ, "SEQUENCER_DATABASE_URL": url},
        check=True,
        capture_output=True,
    )
    engine = db.make_engine(url)
    with db.session_scope(engine) as session:
        entities.create_entity(
            session,
            name="produits",
            label="Produits",
            properties=[
                {"name": "name", "label": "Nom", "type": "text", "required": True},
                {"name": "quantite", "label": "Quantite", "type": "integer"},
            ],
        )
    with db.session_scope(engine) as session:
        records.create_record(
            session, SENDER, {"name": "Boutique", "email": "shop@example.com"}
        )
        shop_list = records.create_record(
            session, CONTACT_LIST, {"name": "Clients", "description": "e2e"}
        )
        records.create_record(
            session,
            CONTACT,
            {
                "email": RECIPIENT,
                "name": "Camille",
                "lists": [shop_list.record["id"]],
            },
        )
        records.create_record(session, "produits", {"name": "Stylo", "quantite": 40})
    engine.dispose()


@pytest.fixture
def dashboard(
    tmp_path: Path, smtp_server: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The dashboard server on a free port, on a fresh SQLite database."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    env = {
        **os.environ,
        "SEQUENCER_DATABASE_URL": url,
        "SEQUENCER_SMTP_URL": smtp_server.url,
        "SEQUENCER_PUBLIC_URL": base,
        "SEQUENCER_SECRET_KEY": "e2e-secret",
        "SEQUENCER_TICK_SECONDS": "0.5",
        "SEQUENCER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "SEQUENCER_TIMEZONE": "Europe/Paris",
    }
    for name, value in env.items():
        if name.startswith("SEQUENCER_"):
            monkeypatch.setenv(name, value)
    config.get_settings.cache_clear()
    db.reset_engine()

    _seed(url)

    python = sys.executable
    log = tmp_path / "server.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [
                python,
                "-m",
                "sequencer",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_http(f"{base}/_stcore/health", server, log)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        db.reset_engine()
        config.get_settings.cache_clear()


# --- Driving Streamlit -------------------------------------------------------------


def settle(page) -> None:
    """Wait for the app, then for the current script run to finish."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=WAIT_MS)
    page.wait_for_timeout(300)
    page.wait_for_selector(
        '[data-testid="stStatusWidget"]', state="hidden", timeout=WAIT_MS
    )
    page.wait_for_timeout(200)


def choose(page, label: str, option: str, *, nth: int = 0) -> None:
    """Pick ``option`` in the ``nth`` selectbox labelled ``label``."""
    page.get_by_role("combobox", name=label, exact=True).nth(nth).click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def type_in(page, label: str, text: str, *, nth: int = 0) -> None:
    """Type into a text input or area and commit it, as a user does."""
    box = page.get_by_label(label, exact=True).nth(nth)
    box.fill(text)
    box.press("Tab")
    settle(page)


def edit_cell(page, *, row: int, column: str, text: str) -> None:
    """Type into one cell of the first data editor, as a keyboard user does.

    The grid is drawn on a canvas: select the row's first cell with the
    mouse, walk to the column with the arrow keys, then Enter edits it.
    """
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for()
    header = grid.locator("[role=columnheader]")
    header.first.wait_for(state="attached")
    headers = [name.strip() for name in header.all_inner_texts()]
    assert column in headers, headers
    box = grid.bounding_box()

    # The grid reacts on animation frames: give each step one to land.
    page.mouse.click(box["x"] + 15, box["y"] + GRID_ROW * (row + 1.5))
    page.wait_for_timeout(300)
    for _ in range(headers.index(column)):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    page.keyboard.press("Control+A")
    page.keyboard.type(text)
    page.wait_for_timeout(300)
    page.keyboard.press("Enter")
    settle(page)


def shoot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def _html_part(message) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "the message has no HTML part"
    return part.get_content()


def _wait_for_text(page, url: str, pattern: str, attempts: int = 40) -> None:
    """Reload ``url`` until ``pattern`` shows: events are written in batches."""
    for _ in range(attempts):
        page.goto(url)
        settle(page)
        if re.search(pattern, page.inner_text('[data-testid="stMain"]')):
            return
        page.wait_for_timeout(1000)
    pytest.fail(f"{pattern!r} never appeared on {url}")


def test_sequence_from_form_sends_and_tracks_in_browser(
    dashboard: str, smtp_server: SMTPSink
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # The link points back at the server: the test reaches no outside site.
        link = f"{dashboard}/_stcore/health?produit=stylo&utm=e2e"
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)

        # The sequences list, then the form.
        page.goto(dashboard)
        settle(page)
        shoot(page, "sequences")
        page.get_by_role("button", name="Create a sequence").click()
        settle(page)

        type_in(page, "Name *", "Stock bas e2e")
        choose(page, "Entity", "Produits", nth=0)
        choose(page, "Property", "Quantite")
        choose(page, "Action", "Update", nth=0)
        choose(page, "Entity", "Emailing", nth=1)
        choose(page, "Action", "Create", nth=1)
        page.get_by_role("button", name="Add condition +").click()
        settle(page)
        choose(page, "Property 1", "quantite")
        choose(page, "Operator 1", "<")
        type_in(page, "Value 1", "10")
        type_in(page, "Subject *", "Stock bas : {name}")
        type_in(page, "Message *", "Il reste {quantite} {name}.")
        type_in(
            page,
            "Html",
            f"<p>Bonjour {{contact.name}}, il reste {{quantite}} {{name}}.</p>"
            f'<p><a href="{link}">Voir le produit</a></p>',
        )
        type_in(page, "Sender *", "1")
        type_in(page, "Contact list", "[1]")
        type_in(page, "Send at *", "now")
        shoot(page, "sequence-form")
        page.get_by_role("button", name="Save", exact=True).click()
        settle(page)
        expect(page.get_by_role("heading", name="Sequences")).to_be_visible()
        page.get_by_text("Stock bas e2e").first.wait_for()
        shoot(page, "sequences-after-save")

        # Lower the product's quantity in the records grid, then save.
        page.goto(f"{dashboard}/records")
        settle(page)
        edit_cell(page, row=0, column="Quantite", text="5")
        page.get_by_role("button", name="Save 1 change").click()
        settle(page)
        toast = page.locator('[data-testid="stToast"]').filter(has_text="ran")
        toast.first.wait_for()
        shoot(page, "records")

        # The message arrives; open its HTML and click its link.
        assert smtp_server.wait_for(1, timeout=60) == 1
        message = smtp_server.parsed(RECIPIENT)[0]
        assert message["Subject"] == "Stock bas : Stylo"
        mail = context.new_page()
        mail.set_content(_html_part(message), wait_until="networkidle")
        with mail.expect_navigation():
            mail.get_by_role("link", name="Voir le produit").click()
        assert mail.url == link
        mail.close()

        # One open and one click, on the Statistics page and the emailing.
        _wait_for_text(page, f"{dashboard}/statistics", r"Open rate\s+100\.0%")
        text = page.inner_text('[data-testid="stMain"]')
        assert re.search(r"Open rate\s+100\.0%\s+1 of 1", text), text
        assert re.search(r"Click rate\s+100\.0%\s+1 of 1", text), text
        shoot(page, "statistics")

        page.goto(f"{dashboard}/emailings")
        settle(page)
        shoot(page, "emailings")
        page.get_by_role("button", name="Open the emailing").click()
        page.wait_for_url(re.compile(r"/emailing\?id=\d+"))
        settle(page)
        main = page.locator('[data-testid="stMain"]')
        expect(main).to_contain_text(re.compile(r"Open\s*1\s*Click\s*1\s*Unsubscribe"))
        shoot(page, "emailing-detail")

        for path in ["entity-groups", "contacts", "activity", "settings"]:
            page.goto(f"{dashboard}/{path}")
            settle(page)
            assert not page.locator('[data-testid="stException"]').count(), path
            shoot(page, path)
        browser.close()
