"""The operators' emergency panel in a real browser against a real controller and simulated speakers:
a drill to one ward plays and is cancelled; drill and live look and read differently; a live city-wide
alert waits for a second operator, who approves it, then everything is cancelled at once; ward staff may
not open the panel. Screenshots: emergency-drill, emergency-live, emergency-approval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.support.console import SIZES, TIMEOUT_MS, create_user, screenshot, seeded_controller, sign_in
from tests.support.scenario import SPEAKERS
from tests.support.system import ControllerHandle, FleetHandle, wait_until

pytestmark = pytest.mark.integration

STORM = {
    "headline": "Cảnh báo bão số 3",
    "text": "Bão số 3 sắp đổ bộ vào thành phố. Người dân ở trong nhà, tránh xa cây lớn và cột điện.",
    "targets": {"areas": ["hn"]},
}
PLAYING_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    with seeded_controller(
        tmp_path_factory.mktemp("emergency"),
        extra_env={"WARDCAST_ALERTS__TEMPLATES": json.dumps({"bao-toan-thanh-pho": STORM})},
    ) as handle:
        create_user(handle, "dieuhanh.a", "operator")
        create_user(handle, "dieuhanh.b", "operator")
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        yield handle


@pytest.fixture(scope="module")
def fleet(console: ControllerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetHandle]:
    """The city's speakers, playing in real time (an alert lasts long enough to be seen and cancelled)."""
    handle = FleetHandle(
        console.broker,
        tmp_path_factory.mktemp("emergency-fleet") / "fleet",
        [address for group in SPEAKERS.values() for address in group],
        console.command_key,
        speed=1.0,
    )
    handle.workdir.mkdir()
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def newest_alert(console: ControllerHandle) -> dict[str, Any]:
    with console.client() as client:
        [alert] = client.get("/api/v1/alerts", params={"limit": 1}).json()
    return dict(alert)


def all_cancelled(console: ControllerHandle, alert_id: str, count: int) -> None:
    def check() -> bool:
        with console.client() as client:
            shown = client.get(f"/api/v1/alerts/{alert_id}").json()
        return bool(shown["status"] == "cancelled" and shown["counts"] == {"cancelled": count})

    wait_until(check, f"all {count} deliveries of alert {alert_id} cancelled")


def test_a_drill_to_one_ward_plays_and_is_cancelled_and_live_looks_different(
    console: ControllerHandle, fleet: FleetHandle, page: Page
):
    sign_in(page, console.base_url, "dieuhanh.a")
    page.goto(console.base_url + "/emergency")
    expect(page.get_by_role("heading", name="Bảng khẩn cấp")).to_be_visible()
    banner = page.locator("#mode-banner")
    send = page.locator("#send-alert")
    # Drill by default: striped amber/black, says so, with the drill wording.
    expect(banner).to_have_class("mode-banner mode-banner-drill")
    expect(banner).to_contain_text("DIỄN TẬP", use_inner_text=True)
    expect(banner).to_contain_text("Đây là tin diễn tập.", use_inner_text=True)
    expect(send).to_have_text("Gửi tin DIỄN TẬP")
    expect(page.locator(".template-card .template-headline")).to_have_text([STORM["headline"]])

    page.get_by_label("Tiêu đề").fill("Diễn tập phòng cháy")
    page.get_by_label("Nội dung (đọc bằng giọng tiếng Việt)").fill(
        "Đây là buổi diễn tập phòng cháy chữa cháy của phường An. Người dân giữ bình tĩnh."
    )
    page.locator('input[name="area"][value="hn.a"]').check()
    expect(page.locator("#target-summary")).to_have_text("Phường An — 5 thiết bị")
    page.get_by_label("Số lần phát lại").fill("10")

    # Live reads and looks otherwise: solid red, a warning, another button.
    page.get_by_role("radio", name="PHÁT THẬT").check()
    expect(banner).to_have_class("mode-banner mode-banner-live")
    expect(banner).to_contain_text("PHÁT THẬT", use_inner_text=True)
    expect(banner).to_contain_text("phát thật ngay lập tức", use_inner_text=True)
    expect(banner).not_to_contain_text("DIỄN TẬP", use_inner_text=True)
    expect(send).to_have_text("PHÁT KHẨN CẤP THẬT")
    expect(page.locator("#alert-form")).to_have_attribute("data-mode", "live")
    screenshot(page, "emergency-live")
    page.get_by_role("radio", name="DIỄN TẬP").check()
    expect(send).to_have_text("Gửi tin DIỄN TẬP")

    send.click()  # a drill needs no confirmation
    expect(page.locator("#send-result")).to_have_text("Đã gửi tới 5 thiết bị.")
    item = page.locator("#active-list li", has_text="Diễn tập phòng cháy")
    expect(item.locator(".mode-badge")).to_have_text("DIỄN TẬP")
    expect(item.locator(".count-playing strong")).to_have_text("5", timeout=PLAYING_TIMEOUT_MS)
    screenshot(page, "emergency-drill")
    drill = newest_alert(console)
    assert drill["mode"] == "drill" and drill["device_count"] == 5

    item.get_by_role("button", name="Hủy tin này").click()
    expect(page.locator("#send-result")).to_have_text("Đã hủy tin.")
    expect(page.locator("#active-list")).to_have_text("Không có cảnh báo nào đang phát.")
    all_cancelled(console, drill["id"], 5)
    row = page.locator(f'#history tr[data-alert-id="{drill["id"]}"]')
    expect(row).to_contain_text("Đã hủy")
    expect(row.locator(".mode-badge")).to_have_text("DIỄN TẬP")


def test_a_live_city_wide_alert_needs_a_second_operator_and_cancel_all_stops_it(
    console: ControllerHandle, fleet: FleetHandle, page: Page, browser: Browser
):
    sign_in(page, console.base_url, "dieuhanh.a")
    page.goto(console.base_url + "/emergency")
    page.locator(".template-card", has_text=STORM["headline"]).click()
    expect(page.get_by_label("Tiêu đề")).to_have_value(STORM["headline"])
    expect(page.locator('input[name="area"][value="hn"]')).to_be_checked()
    expect(page.locator("#template-note")).to_contain_text("Đang dùng mẫu: Cảnh báo bão số 3")
    page.get_by_label("Số lần phát lại").fill("10")
    page.get_by_role("radio", name="PHÁT THẬT").check()
    expect(page.locator("#send-alert")).to_have_text("PHÁT KHẨN CẤP THẬT")
    page.locator("#send-alert").click()

    dialog = page.get_by_role("dialog", name="Xác nhận PHÁT THẬT")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#confirm-targets")).to_have_text("Thành phố Thử — 8 thiết bị")
    confirm = dialog.get_by_role("button", name="PHÁT KHẨN CẤP THẬT")
    expect(confirm).to_be_disabled()
    dialog.get_by_label("Gõ “PHÁT THẬT” để xác nhận").fill("phát thật")
    confirm.click()
    expect(page.locator("#send-result")).to_have_text("Tin đang chờ một người khác duyệt trước khi phát.")
    expect(page.locator("#send-alert")).to_have_text("Gửi tin DIỄN TẬP")  # back to drill after a live one

    waiting = page.locator("#pending-list li", has_text=STORM["headline"])
    expect(waiting).to_contain_text("Người tạo: dieuhanh.a (bạn)")
    expect(waiting.locator(".mode-badge")).to_have_text("PHÁT THẬT")
    waiting.get_by_role("button", name="Duyệt và phát").click()  # the same person may not
    expect(waiting.get_by_role("alert")).to_have_text(
        "Authorization: the second person must use another key than the one that created it"
    )
    screenshot(page, "emergency-approval")
    alert = newest_alert(console)
    assert alert["status"] == "pending_approval" and alert["created_by_name"] == "dieuhanh.a"

    context = browser.new_context(viewport=SIZES["desktop"], locale="vi-VN")
    context.set_default_timeout(TIMEOUT_MS)
    try:
        second = context.new_page()
        sign_in(second, console.base_url, "dieuhanh.b")
        second.goto(console.base_url + "/emergency")
        theirs = second.locator("#pending-list li", has_text=STORM["headline"])
        expect(theirs).to_contain_text("Người tạo: dieuhanh.a")
        expect(theirs).not_to_contain_text("(bạn)")
        theirs.get_by_role("button", name="Duyệt và phát").click()
        expect(second.locator("#send-result")).to_have_text("Đã duyệt: tin đang phát.")
        expect(second.locator("#pending-list")).to_have_text("Không có tin nào chờ duyệt.")
        playing = second.locator("#active-list li", has_text=STORM["headline"])
        expect(playing.locator(".count-playing strong")).to_have_text("8", timeout=PLAYING_TIMEOUT_MS)
        # The first operator's panel follows on its own.
        expect(page.locator("#active-list li", has_text=STORM["headline"])).to_be_visible()

        second.get_by_role("button", name="HỦY TẤT CẢ").click()
        sure = second.get_by_role("dialog", name="Hủy tất cả cảnh báo?")
        expect(sure).to_be_visible()
        sure.get_by_role("button", name="Xác nhận HỦY TẤT CẢ").click()
        expect(second.locator("#cancel-all-result")).to_have_text("Đã hủy 1 cảnh báo, dừng 8 lượt phát.")
        expect(second.locator("#active-list")).to_have_text("Không có cảnh báo nào đang phát.")
    finally:
        context.close()
    all_cancelled(console, alert["id"], 8)


def test_ward_staff_may_not_open_the_emergency_panel(console: ControllerHandle, page: Page):
    sign_in(page, console.base_url, "canbo.an")
    response = page.goto(console.base_url + "/emergency")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Không có quyền")).to_be_visible()
    nav = page.get_by_role("navigation", name="Điều hướng chính")
    expect(nav.get_by_role("link", name="Khẩn cấp")).to_have_count(0)
    refused = page.evaluate("Wardcast.api('GET', '/api/v1/alerts/templates').catch(e => e.status)")
    assert refused == 403
