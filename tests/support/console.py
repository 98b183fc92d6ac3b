"""Browser tests of the web console: Debian's Chromium driven by Playwright against a real controller.

Fixtures: `browser` (one Chromium per test module), `page` (a fresh context at desktop size, Vietnamese
locale). Helpers: `create_user` (through the API; `create_user_with_cli` as the first admin is made),
`sign_in`, `screenshot` (the page at 1366×768 and at 390 px phone width into tests/artifacts/console/, on
every run), `seeded_controller` (a controller with its own broker on the small test city)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.broker import start_test_broker
from tests.support.scenario import seed
from tests.support.system import ControllerHandle

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "artifacts" / "console"
SIZES = {"desktop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}
PASSWORD = "mật-khẩu-đủ-dài-1"  # a non-ASCII password travels as UTF-8 through the form
TIMEOUT_MS = 20_000


def create_user(controller: ControllerHandle, username: str, role: str, *wards: str) -> None:
    """Through the API (/api/v1/users), as the users page does; `create_user_with_cli` as an admin's
    first user is made."""
    with controller.client() as client:
        response = client.post(
            "/api/v1/users",
            json={"username": username, "role": role, "wards": list(wards), "password": PASSWORD},
        )
    assert response.status_code == 201, response.text


def create_user_with_cli(controller: ControllerHandle, username: str, role: str, *wards: str) -> None:
    args = ["user", "create", "--username", username, "--role", role, "--password-stdin"]
    for ward in wards:
        args += ["--ward", ward]
    result = subprocess.run(
        [sys.executable, "-m", "controller", *args],
        input=PASSWORD + "\n",
        env=controller.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def seeded_controller(workdir: Path, **options: object) -> Iterator[ControllerHandle]:
    """A controller on SQLite with its own broker, seeded with the test city (tests.support.scenario)."""
    broker = start_test_broker(workdir / "mosquitto")
    handle = ControllerHandle(
        workdir=workdir, database_url=f"sqlite:///{workdir / 'wardcast.db'}", broker=broker, **options
    )
    handle.start()
    try:
        seed(handle)
        yield handle
    finally:
        handle.stop()
        broker.broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=SIZES["desktop"], locale="vi-VN")
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def screenshot(page: Page, name: str) -> None:
    """The page at both sizes (full height), then back to the desktop size."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for size_name, size in SIZES.items():
        page.set_viewport_size(size)
        page.screenshot(path=ARTIFACTS / f"{name}-{size_name}.png", full_page=True)
    page.set_viewport_size(SIZES["desktop"])


def sign_in(page: Page, base_url: str, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{base_url}/login")
    page.get_by_label("Tên đăng nhập").fill(username)
    page.get_by_label("Mật khẩu").fill(password)
    page.get_by_role("button", name="Đăng nhập").click()
    expect(page).not_to_have_url(f"{base_url}/login")
