"""The console's record pages in a real browser: the device map (no request leaves the machine with the
default config; tiles from the configured URL only), the broadcast log with per-device states and
cancel, the ward report with its CSV export, and user management."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from controller.broker import free_tcp_port
from tests.support.console import PASSWORD, create_user, screenshot, seeded_controller, sign_in
from tests.support.scenario import place_speakers, running_fleet, send, upload
from tests.support.system import ControllerHandle, wait_until

pytestmark = pytest.mark.integration

MARKERS = ".leaflet-marker-icon.device-marker"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    with seeded_controller(tmp_path_factory.mktemp("records")) as handle:
        place_speakers(handle)
        create_user(handle, "admin", "admin")
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        yield handle


def sign_out(page: Page) -> None:
    page.get_by_role("button", name="Đăng xuất").click()
    expect(page).to_have_url(re.compile(r"/login$"))


def test_map_shows_the_devices_with_no_request_leaving_the_machine(console: ControllerHandle, page: Page):
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    sign_in(page, console.base_url, "admin")
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Bản đồ").click()
    expect(page.get_by_role("heading", name="Bản đồ thiết bị")).to_be_visible()
    expect(page.locator(MARKERS)).to_have_count(8)
    expect(page.locator("#device-table tbody tr")).to_have_count(8)
    expect(page.get_by_text("Chưa cấu hình nền bản đồ")).to_be_visible()
    expect(page.locator("#device-map.no-tiles")).to_have_count(1)
    expect(page.locator(f'{MARKERS}[data-status="offline"]')).to_have_count(8)

    # Speakers of a group share a spot: the list below the map reaches each one (keyboard, screen reader).
    page.locator('#device-table tr[data-device-id="spk-b1-1"]').get_by_role(
        "button", name="Xem trên bản đồ"
    ).click()
    popup = page.locator(".leaflet-popup-content")
    expect(popup).to_contain_text("spk-b1-1")
    expect(popup).to_contain_text("Cụm loa")
    expect(popup).to_contain_text("Thôn Nà Pài")
    expect(popup).to_contain_text("Mất kết nối")
    page.get_by_label("Địa bàn").select_option("hn.b")
    expect(page.locator(MARKERS)).to_have_count(3)
    expect(page.locator("#device-table tbody tr")).to_have_count(3)
    page.get_by_label("Địa bàn").select_option("")
    expect(page.locator(MARKERS)).to_have_count(8)
    for corner in ("spk-a3-1", "spk-b2-1"):  # the map fits all the devices again
        expect(page.locator(f'{MARKERS}[data-device-id="{corner}"]')).to_be_in_viewport()
    screenshot(page, "records-map")
    outside = [url for url in requests if not url.startswith(console.base_url + "/")]
    assert not outside, outside

    sign_out(page)
    sign_in(page, console.base_url, "canbo.an")
    page.goto(console.base_url + "/map")
    expect(page.locator(MARKERS)).to_have_count(5)
    expect(page.locator('#device-table tr[data-device-id="spk-b1-1"]')).to_have_count(0)
    expect(page.get_by_role("option", name="Xã Bình")).to_have_count(0)
    outside = [url for url in requests if not url.startswith(console.base_url + "/")]
    assert not outside, outside


def test_map_tiles_come_from_the_configured_url_only(browser: Browser, tmp_path: Path):
    tiles = f"http://127.0.0.1:{free_tcp_port()}/tiles"  # nothing listens there: the requests are enough
    env = {"WARDCAST_CONSOLE__MAP__TILE_URL": tiles + "/{z}/{x}/{y}.png"}
    with seeded_controller(tmp_path, extra_env=env) as handle:
        create_user(handle, "admin", "admin")
        context = browser.new_context(locale="vi-VN")
        try:
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            sign_in(page, handle.base_url, "admin")
            with page.expect_request(re.compile(re.escape(tiles) + r"/\d+/\d+/\d+\.png")):
                page.goto(handle.base_url + "/map")
            expect(page.locator(MARKERS)).to_have_count(8)
            expect(page.get_by_text("Chưa cấu hình nền bản đồ")).to_have_count(0)
            elsewhere = [url for url in requests if not url.startswith((handle.base_url + "/", tiles + "/"))]
            assert not elsewhere, elsewhere
        finally:
            context.close()


def test_the_log_shows_a_broadcast_with_its_device_states_and_cancels_it(
    console: ControllerHandle, page: Page
):
    media_id = upload(console, 1.0)
    other_ward = send(console, media_id, targets={"areas": ["hn.b.t1"]})
    ours = send(console, media_id, targets={"areas": ["hn.a.t1"]}, priority="priority")
    sign_in(page, console.base_url, "canbo.an")  # ward staff may cancel in their ward
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Nhật ký phát").click()
    row = page.locator(f'tr.broadcast[data-broadcast-id="{ours["id"]}"]')
    expect(row).to_contain_text("Ưu tiên")
    expect(row).to_contain_text("tone-1.0.wav")
    expect(row).to_contain_text("Tổ dân phố 1")
    expect(row).to_contain_text("test-admin")
    expect(row).to_contain_text("Đang thực hiện")
    expect(page.locator(f'tr.broadcast[data-broadcast-id="{other_ward["id"]}"]')).to_have_count(0)

    row.get_by_role("button", name="Chi tiết").click()
    detail = page.locator(f"#detail-{ours['id']}")
    expect(detail.locator("tbody tr")).to_have_count(2)
    # The speakers are offline: the command waits (queued) or sits with the broker (sent).
    expect(detail.locator('tr[data-device-id="spk-a1-1"]')).to_contain_text(re.compile("Chờ gửi|Đã gửi"))
    screenshot(page, "records-log")

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Hủy phát").click()
    expect(page.get_by_text("Đã hủy lượt phát.")).to_be_visible()
    expect(row).to_contain_text("Đã hủy")
    expect(row.get_by_role("button", name="Hủy phát")).to_have_count(0)
    row.get_by_role("button", name="Chi tiết").click()
    expect(detail.locator('tr[data-device-id="spk-a1-1"]')).to_contain_text("Đã hủy")
    page.get_by_label("Mức ưu tiên").select_option("normal")
    page.get_by_role("button", name="Lọc").click()
    expect(row).to_have_count(0)


def test_the_report_counts_plays_and_exports_csv_with_vietnamese_names(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    sign_in(page, console.base_url, "canbo.an")
    page.goto(console.base_url + "/map")
    marker = page.locator(f'{MARKERS}[data-device-id="spk-a1-1"]')
    expect(marker).to_have_attribute("data-status", "offline")
    expect(page.locator("body")).to_have_attribute("data-live", "on")
    with running_fleet(tmp_path / "fleet", console.broker, command_key=console.command_key):
        expect(marker).to_have_attribute("data-status", "online", timeout=60_000)  # live, from the events
        media_id = upload(console, 0.5)
        accepted = send(console, media_id, targets={"areas": ["hn.a.t1"]})

        def finished() -> bool:
            with console.client() as client:
                return client.get(f"/api/v1/broadcasts/{accepted['id']}").json()["state"] == "finished"

        wait_until(finished, "the broadcast played on both speakers of Tổ dân phố 1")
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Báo cáo").click()
    expect(page.get_by_role("heading", name="Báo cáo phát thanh")).to_be_visible()
    expect(page.get_by_label("Phường/xã").locator("option")).to_have_text(["Phường An"])
    device = page.locator('#report-devices tr[data-device-id="spk-a1-1"]')
    expect(device).to_contain_text("Tổ dân phố 1")
    played_ok = device.locator("td").nth(2)  # after the area and "scheduled"
    expect(played_ok).to_have_text("1")
    expect(page.locator("#report-devices tfoot")).to_contain_text("Tổng cộng")
    expect(page.locator("#report-broadcasts tbody tr")).not_to_have_count(0)
    screenshot(page, "records-report")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Xuất CSV theo thiết bị").click()
    download = download_info.value
    assert download.suggested_filename.startswith("plays-device-hn.a-")
    body = Path(download.path()).read_bytes()
    assert body.startswith(b"\xef\xbb\xbf")  # UTF-8 with a byte order mark, for Excel
    text = body.decode("utf-8-sig")
    assert "Phường An" in text and "Tổ dân phố 1" in text and "spk-a1-1" in text
    assert "Xã Bình" not in text


def test_admin_creates_a_ward_user_who_sees_only_their_ward(console: ControllerHandle, page: Page):
    sign_in(page, console.base_url, "admin")
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Quản lý").click()
    page.get_by_role("link", name="Người dùng").click()
    expect(page.locator('#users-table tr[data-username="canbo.an"]')).to_contain_text("Phường An")
    form = page.locator("#create-form")
    form.get_by_label("Tên đăng nhập").fill("canbo.binh")
    form.get_by_label("Vai trò").select_option("ward_staff")
    form.get_by_label("Xã Bình").check()
    form.get_by_label("Mật khẩu", exact=True).fill(PASSWORD)
    form.get_by_label("Nhập lại mật khẩu").fill(PASSWORD + "x")
    form.get_by_role("button", name="Tạo người dùng").click()
    expect(form.get_by_role("alert")).to_have_text(
        "Nhập lại mật khẩu (password_confirm): hai mật khẩu không giống nhau."
    )
    expect(form.get_by_label("Nhập lại mật khẩu")).to_have_attribute("aria-invalid", "true")
    form.get_by_label("Nhập lại mật khẩu").fill(PASSWORD)
    form.get_by_label("Tên đăng nhập").fill("canbo.an")  # taken: the API names the field
    form.get_by_role("button", name="Tạo người dùng").click()
    expect(form.get_by_role("alert")).to_contain_text("Tên đăng nhập (username):")
    form.get_by_label("Tên đăng nhập").fill("canbo.binh")
    form.get_by_role("button", name="Tạo người dùng").click()
    expect(page.get_by_text("Đã tạo người dùng canbo.binh.")).to_be_visible()
    new_row = page.locator('#users-table tr[data-username="canbo.binh"]')
    expect(new_row).to_contain_text("Cán bộ phường")
    expect(new_row).to_contain_text("Xã Bình")
    expect(page.locator('#users-table tr[data-username="admin"]')).to_contain_text("(bạn)")
    screenshot(page, "records-users")

    sign_out(page)
    sign_in(page, console.base_url, "canbo.binh")
    expect(page.locator(".area-name")).to_have_text(["Xã Bình", "Thôn Nà Pài", "Thôn Khuổi Đắng"])
    expect(page.get_by_role("link", name="Người dùng")).to_have_count(0)
    response = page.goto(console.base_url + "/users")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Không có quyền")).to_be_visible()
