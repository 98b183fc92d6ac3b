"""The web console in a real browser (Debian's Chromium driven by Playwright) against a real controller:
sign-in and lock-out, the Vietnamese area tree, the English switch, a ward's confinement, live status.
Screenshots of every page at desktop and phone sizes go to tests/artifacts/console/ on every run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.console import (
    PASSWORD,
    create_user,
    create_user_with_cli,
    screenshot,
    seeded_controller,
    sign_in,
)
from tests.support.scenario import SPEAKERS, running_fleet
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    with seeded_controller(tmp_path_factory.mktemp("console")) as handle:
        create_user_with_cli(handle, "admin", "admin")  # the first admin, as `wardcast user create` makes it
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        yield handle


def attempt_sign_in(page: Page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/login")
    page.get_by_label("Tên đăng nhập").fill(username)
    page.get_by_label("Mật khẩu").fill(password)
    page.get_by_role("button", name="Đăng nhập").click()
    expect(page.get_by_role("alert")).to_be_visible()


def test_login_page_is_vietnamese_and_a_wrong_password_names_the_field(console: ControllerHandle, page: Page):
    page.goto(console.base_url + "/")
    expect(page).to_have_url(console.base_url + "/login")
    expect(page.get_by_role("heading", name="Đăng nhập")).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "vi")
    screenshot(page, "login")

    attempt_sign_in(page, console.base_url, "admin", "sai-mật-khẩu-rồi")
    expect(page.get_by_role("alert")).to_have_text("Mật khẩu: tên đăng nhập hoặc mật khẩu không đúng.")
    expect(page.get_by_label("Mật khẩu")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Tên đăng nhập")).to_have_value("admin")
    screenshot(page, "login-error")

    page.get_by_label("Tên đăng nhập").fill("")
    page.get_by_role("button", name="Đăng nhập").click()
    expect(page.get_by_role("alert")).to_have_text("Tên đăng nhập: vui lòng nhập tên đăng nhập.")


def test_five_failures_lock_the_account_even_for_the_right_password(console: ControllerHandle, page: Page):
    create_user(console, "bi.khoa", "operator")
    page.goto(console.base_url + "/login")
    expect(page.get_by_text("Sau 5 lần nhập sai mật khẩu, tài khoản bị khóa trong 15 phút.")).to_be_visible()
    for attempt in range(5):
        attempt_sign_in(page, console.base_url, "bi.khoa", f"sai-{attempt}-mật-khẩu")
    expect(page.get_by_role("alert")).to_contain_text("Tên đăng nhập: tài khoản bị khóa đến")
    attempt_sign_in(page, console.base_url, "bi.khoa", PASSWORD)  # the right password, while locked
    expect(page.get_by_role("alert")).to_contain_text("tài khoản bị khóa")
    expect(page).to_have_url(console.base_url + "/login")
    screenshot(page, "login-locked")


def test_a_post_without_the_csrf_token_is_refused(console: ControllerHandle, page: Page):
    page.goto(console.base_url + "/login")
    response = page.request.post(
        console.base_url + "/login", form={"username": "admin", "password": PASSWORD, "csrf": "forged"}
    )
    assert response.status == 403
    anonymous = page.request.get(console.base_url + "/console/events")
    assert anonymous.status == 401
    sign_in(page, console.base_url, "admin")
    expect(page.get_by_role("heading", name="Bảng điều khiển", exact=True)).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "wardcast_session")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"


def test_dashboard_shows_the_area_tree_with_diacritics_and_switches_to_english(
    console: ControllerHandle, page: Page
):
    sign_in(page, console.base_url, "admin")
    expect(page.get_by_role("heading", name="Bảng điều khiển", exact=True)).to_be_visible()
    names = page.locator(".area-name")
    expect(names).to_have_text(
        [
            *("Thành phố Thử", "Phường An", "Tổ dân phố 1", "Tổ dân phố 2", "Tổ dân phố 3"),
            *("Xã Bình", "Thôn Nà Pài", "Thôn Khuổi Đắng"),
        ]
    )
    expect(page.locator(".device")).to_have_count(sum(len(group) for group in SPEAKERS.values()))
    expect(page.locator("#count-offline")).to_have_text("8")
    expect(page.get_by_text("Cảnh báo đang hoạt động")).to_be_visible()
    expect(page.locator("#alarms")).to_have_text("Không có cảnh báo nào.")
    # htmx is served from the controller (vendored from the npm registry by `make`), not from a CDN.
    assert page.evaluate("typeof htmx") == "object"
    fragment = page.request.get(console.base_url + "/console/alarms")
    assert fragment.status == 200
    assert "Không có cảnh báo nào." in fragment.text()
    expect(page.locator('.device[data-device-id="spk-a1-1"] .device-status')).to_have_text("Mất kết nối")
    screenshot(page, "dashboard-vi")

    page.get_by_role("link", name="English").click()
    expect(page.get_by_role("heading", name="Dashboard", exact=True)).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("heading", name="Areas and devices")).to_be_visible()
    expect(page.locator('.device[data-device-id="spk-a1-1"] .device-status')).to_have_text("Offline")
    expect(names.first).to_have_text("Thành phố Thử")  # data stays as it is
    screenshot(page, "dashboard-en")
    page.goto(console.base_url + "/")  # the choice is remembered
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    page.get_by_role("link", name="Tiếng Việt").click()
    expect(page.get_by_role("button", name="Đăng xuất")).to_be_visible()
    page.get_by_role("button", name="Đăng xuất").click()
    expect(page).to_have_url(console.base_url + "/login")
    page.goto(console.base_url + "/")
    expect(page).to_have_url(console.base_url + "/login")


def test_ward_staff_sees_only_their_ward(console: ControllerHandle, page: Page):
    sign_in(page, console.base_url, "canbo.an")
    expect(page.locator(".area-name")).to_have_text(
        ["Phường An", "Tổ dân phố 1", "Tổ dân phố 2", "Tổ dân phố 3"]
    )
    expect(page.get_by_text("Phạm vi: Phường An")).to_be_visible()
    expect(page.locator(".device")).to_have_count(5)
    expect(page.get_by_text("Xã Bình")).to_have_count(0)
    expect(page.locator('.device[data-device-id="spk-b1-1"]')).to_have_count(0)
    screenshot(page, "dashboard-ward-staff")


def test_a_speaker_coming_online_changes_its_status_live(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    sign_in(page, console.base_url, "admin")
    device = page.locator('.device[data-device-id="spk-a1-1"]')
    expect(device.locator(".device-status")).to_have_text("Mất kết nối")
    expect(page.locator("body")).to_have_attribute("data-live", "on")  # the event stream is open
    with running_fleet(tmp_path / "fleet", console.broker, command_key=console.command_key):
        expect(device).to_have_attribute("data-status", "online", timeout=60_000)
        expect(device.locator(".device-status")).to_have_text("Trực tuyến")
        expect(page.locator("#count-online")).to_have_text("8", timeout=60_000)
        expect(page.locator("#count-offline")).to_have_text("0")
        screenshot(page, "dashboard-live")


def test_pages_call_the_api_as_the_signed_in_user_with_the_csrf_header(console: ControllerHandle, page: Page):
    page.goto(console.base_url + "/?lang=vi")  # sign in first, then come back
    expect(page).to_have_url(console.base_url + "/login?next=%2F%3Flang%3Dvi")
    page.get_by_label("Tên đăng nhập").fill("canbo.an")
    page.get_by_label("Mật khẩu").fill(PASSWORD)
    page.get_by_role("button", name="Đăng nhập").click()
    expect(page).to_have_url(console.base_url + "/?lang=vi")
    nav = page.get_by_role("navigation", name="Điều hướng chính")
    expect(nav.get_by_role("link", name="Thông báo mới")).to_be_visible()
    expect(nav.get_by_role("link", name="Thiết bị")).to_have_count(0)
    areas = page.evaluate("Wardcast.api('GET', '/api/v1/areas').then(a => a.map(x => x.code))")
    assert "hn.a" in areas
    forged = page.evaluate(
        """fetch('/api/v1/broadcasts', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: '{}'}).then(r => r.json().then(b => [r.status, b.field]))"""
    )
    assert forged == [403, "X-CSRF-Token"]
    refused = page.evaluate(
        """Wardcast.api('POST', '/api/v1/broadcasts', {content: {tts: 'x'}, targets: {areas: ['hn.b']}})
            .catch(e => [e.status, e.field])"""
    )
    assert refused[0] == 422
