"""The management pages in a real browser: areas (add, import, a refused code named), the audio library
(upload and listen; a file that is not audio refused), API keys (created once-shown, used, revoked), sensor
rules and alarms, the audit log, and what a ward's staff may open."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.support.console import create_user, screenshot, seeded_controller, sign_in
from tests.support.scenario import wav_bytes
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    with seeded_controller(tmp_path_factory.mktemp("console-manage")) as handle:
        create_user(handle, "admin", "admin")
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        yield handle


def test_an_admin_adds_and_imports_areas_and_a_refused_code_is_named(console: ControllerHandle, page: Page):
    sign_in(page, console.base_url, "admin")
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Quản lý").click()
    expect(page.get_by_role("heading", level=2)).to_have_text(
        [
            "Địa bàn",
            "Thư viện âm thanh",
            "Quy tắc cảm biến và cảnh báo",
            "Người dùng",
            "Khóa API và bí mật thiết bị",
            "Nhật ký thao tác",
        ]
    )
    screenshot(page, "manage-hub")
    page.get_by_role("link", name="Địa bàn").click()
    rows = page.locator("#areas-table tbody tr")
    expect(rows).to_have_count(8)
    page.get_by_label("Mã", exact=True).fill("hn.a.t4")
    page.get_by_label("Tên", exact=True).fill("Tổ dân phố 4")
    page.get_by_label("Loại").select_option("group")
    page.get_by_label("Thuộc").select_option("hn.a")
    page.get_by_role("button", name="Thêm địa bàn").click()
    expect(rows).to_have_count(9)
    expect(page.locator("#areas-table")).to_contain_text("Tổ dân phố 4")

    page.get_by_label("Tên", exact=True).fill("Tổ dân phố 4 trùng mã")
    page.get_by_label("Mã", exact=True).fill("hn.a.t4")
    page.get_by_role("button", name="Thêm địa bàn").click()
    expect(page.locator("#area-form .form-error")).to_contain_text("Mã (code): area 'hn.a.t4' already exists")
    expect(page.get_by_label("Mã", exact=True)).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Tệp YAML hoặc CSV").set_input_files(
        files=[
            {
                "name": "thon.csv",
                "mimeType": "text/csv",
                "buffer": "code,name,kind,parent\nhn.b.t3,Thôn Bản Cạu,group,hn.b\n".encode(),
            }
        ]
    )
    page.get_by_role("button", name="Nhập", exact=True).click()
    expect(page.locator("#area-import-form .result")).to_have_text("Đã nhập: 1 mới, 0 cập nhật, 0 không đổi.")
    expect(rows).to_have_count(10)
    expect(page.locator("#areas-table")).to_contain_text("Thôn Bản Cạu")
    screenshot(page, "manage-areas")


def test_audio_library_uploads_plays_and_refuses_a_file_that_is_not_audio(
    console: ControllerHandle, page: Page
):
    sign_in(page, console.base_url, "canbo.an")
    page.goto(console.base_url + "/media")
    page.get_by_label("Tệp âm thanh").set_input_files(
        files=[{"name": "thong-bao.wav", "mimeType": "audio/wav", "buffer": wav_bytes(1.5)}]
    )
    page.get_by_role("button", name="Tải lên").click()
    expect(page.locator("#media-form .result")).to_have_text("Đã tải lên: thong-bao.wav (1.5 giây).")
    player = page.get_by_label("thong-bao.wav")
    expect(player).to_have_count(1)
    duration = player.evaluate(
        "a => new Promise(done => { a.onloadedmetadata = () => done(a.duration); a.load(); })"
    )
    assert duration == pytest.approx(1.5, abs=0.05)

    page.get_by_label("Tệp âm thanh").set_input_files(
        files=[{"name": "khong-phai.wav", "mimeType": "audio/wav", "buffer": b"day khong phai am thanh"}]
    )
    page.get_by_role("button", name="Tải lên").click()
    expect(page.locator("#media-form .form-error")).to_contain_text("Tệp âm thanh (file)")
    expect(page.locator("#media-table tbody tr")).to_have_count(1)  # nothing half-stored
    screenshot(page, "manage-media")


def test_an_api_key_is_shown_once_works_and_is_revoked_and_the_audit_log_shows_its_calls(
    console: ControllerHandle, page: Page
):
    sign_in(page, console.base_url, "admin")
    page.goto(console.base_url + "/keys")
    page.get_by_label("Tên", exact=True).fill("IOC Bắc Kạn")
    page.get_by_label("Vai trò", exact=True).select_option("ioc")
    page.get_by_role("button", name="Tạo khóa").click()
    expect(page.locator("#key-token-value")).to_have_text(re.compile(r"^wc_\S+$"))
    token = page.locator("#key-token-value").inner_text()
    row = page.locator("#keys-table tbody tr", has_text="IOC Bắc Kạn")
    expect(row).to_contain_text("Đang dùng")
    with httpx.Client(base_url=console.base_url, headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/api/v1/areas").status_code == 200
    screenshot(page, "manage-keys")

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Thu hồi").click()
    expect(row).to_contain_text("Đã thu hồi")
    with httpx.Client(base_url=console.base_url, headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/api/v1/areas").status_code == 401

    page.goto(console.base_url + "/audit")
    expect(page.locator("#audit-table tbody tr", has_text="IOC Bắc Kạn").first).to_contain_text(
        "/api/v1/areas"
    )
    screenshot(page, "manage-audit")


def test_rules_page_lists_and_names_a_refused_field_and_ward_staff_may_not_open_keys(
    console: ControllerHandle, page: Page
):
    sign_in(page, console.base_url, "admin")
    page.goto(console.base_url + "/rules")
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    page.get_by_label("Tên quy tắc").fill("Mực nước cao")
    page.get_by_role("button", name="Thêm quy tắc").click()  # no sensor chosen: the API names the field
    expect(page.locator("#rule-form .form-error")).to_contain_text("device_id")
    screenshot(page, "manage-rules")

    page.context.clear_cookies()
    sign_in(page, console.base_url, "canbo.an")
    page.goto(console.base_url + "/manage")
    expect(page.get_by_role("heading", level=2)).to_have_text(
        ["Địa bàn", "Thư viện âm thanh", "Quy tắc cảm biến và cảnh báo"]
    )
    page.goto(console.base_url + "/keys")
    expect(page.get_by_role("heading", name="Không có quyền")).to_be_visible()
    page.goto(console.base_url + "/areas")
    expect(page.locator("#areas-table tbody tr").first).to_be_visible()
    expect(page.get_by_role("button", name="Thêm địa bàn")).to_have_count(0)  # staff may not edit the tree


def test_nothing_is_fetched_from_another_origin(console: ControllerHandle, page: Page, tmp_path: Path):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, console.base_url, "admin")
    for path in ("/manage", "/areas", "/media", "/rules", "/keys", "/audit"):
        page.goto(console.base_url + path)
        expect(page.locator("h1")).to_be_visible()
    assert requested
    assert all(url.startswith(console.base_url) for url in requested), [
        url for url in requested if not url.startswith(console.base_url)
    ]
