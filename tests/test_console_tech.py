"""The technician's console pages in a real browser (Chromium driven by Playwright) against a real
controller: devices confined to the technician's wards, registration with its provisioning bundle, a CSV
import's row errors, a test tone followed to its end on a simulated speaker, live status, a claim approved,
firmware rollouts with their progress. Screenshots go to tests/artifacts/console/ on every run."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.sync_api import Locator, Page, expect

from tests.support.console import create_user, screenshot, seeded_controller, sign_in
from tests.support.firmware import SigningKey, make_image, upload_image
from tests.support.scenario import running_fleet
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration

WARD_A = ["spk-a1-1", "spk-a1-2", "spk-a2-1", "spk-a2-2", "spk-a3-1"]
FIRMWARE_KEY = SigningKey(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    workdir = tmp_path_factory.mktemp("console-tech")
    firmware = {
        "WARDCAST_FIRMWARE__TRUSTED_KEYS": json.dumps([FIRMWARE_KEY.public_b64]),
        "WARDCAST_FIRMWARE__DIR": str(workdir / "firmware"),
        "WARDCAST_FIRMWARE__MAX_BYTES": str(1_000_000),
    }
    with seeded_controller(workdir, extra_env=firmware) as handle:
        create_user(handle, "admin", "admin")
        create_user(handle, "kythuat.an", "technician", "hn.a")
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        yield handle


def row(page: Page, device_id: str) -> Locator:
    return page.locator(f'#devices-table tr[data-device-id="{device_id}"]')


def test_a_technician_sees_their_wards_devices_registers_one_and_imports_a_csv(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    sign_in(page, console.base_url, "kythuat.an")
    page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Thiết bị").click()
    expect(page.get_by_role("heading", name="Thiết bị", exact=True)).to_be_visible()
    expect(page.locator("#devices-table tbody tr")).to_have_count(len(WARD_A))
    expect(row(page, "spk-b1-1")).to_have_count(0)
    expect(page.get_by_role("combobox", name="Địa bàn").first.locator("option")).to_contain_text(
        ["Tất cả", "Phường An", "Tổ dân phố 1"]
    )
    expect(row(page, "spk-a1-1").locator(".device-status")).to_have_text("Mất kết nối")
    page.get_by_label("Tìm kiếm").fill("a2-")
    expect(page.locator("#devices-table tbody tr:visible")).to_have_count(2)
    expect(page.locator("#device-count")).to_have_text("Hiển thị 2/5 thiết bị")
    page.get_by_label("Tìm kiếm").fill("")
    page.locator("#filter-area").select_option("hn.a.t3")
    expect(page.locator("#devices-table tbody tr:visible")).to_have_count(1)
    page.locator("#filter-area").select_option("")

    form = page.locator("#register-form")
    form.get_by_label("Địa bàn").select_option("hn.a.t2")
    form.get_by_label("Mã thiết bị (để trống: tự tạo)").fill("spk-cho-1")
    form.get_by_label("Tên").fill("Loa chợ Đồng Xuân")
    form.get_by_role("button", name="Đăng ký").click()
    result = page.locator("#register-result")
    expect(result.get_by_role("heading", name="Đã đăng ký thiết bị spk-cho-1")).to_be_visible()
    expect(result.get_by_role("img", name="Mã QR của gói cấu hình thiết bị spk-cho-1")).to_be_visible()
    with page.expect_download() as download:
        result.get_by_role("link", name="Tải gói cấu hình (JSON)").click()
    bundle = json.loads(Path(download.value.path()).read_text())
    assert (bundle["device_id"], bundle["area"]) == ("spk-cho-1", "hn.a.t2")
    assert len(bundle["password"]) >= 32
    screenshot(page, "tech-devices")

    form.get_by_label("Mã thiết bị (để trống: tự tạo)").fill("spk-cho-1")  # taken now
    form.get_by_role("button", name="Đăng ký").click()
    expect(form.get_by_role("alert")).to_contain_text("Mã thiết bị (để trống: tự tạo) (id): ")
    expect(form.get_by_label("Mã thiết bị (để trống: tự tạo)")).to_have_attribute("aria-invalid", "true")

    csv = "kind,area,id\nspeaker,hn.a.t3,spk-csv-1\nspeaker,hn.b.t1,spk-csv-2\n"
    page.get_by_label("Tệp CSV", exact=True).set_input_files(
        {"name": "thiet-bi.csv", "mimeType": "text/csv", "buffer": csv.encode()}
    )
    page.get_by_role("button", name="Nhập", exact=True).click()
    report = page.locator("#import-result")
    expect(report.get_by_role("heading")).to_have_text("Đã tạo 1 thiết bị, 1 dòng bị từ chối")
    expect(report.locator("#import-errors tbody tr")).to_have_count(1)
    expect(report.locator("#import-errors tbody tr td")).to_have_text(
        ["Dòng 3", "area", "area 'hn.b.t1' is outside ward 'hn.a' of this key"]
    )

    with console.client() as client:
        sensor = {"id": "sen-song-1", "kind": "sensor", "area": "hn.a.t1", "name": "Mực nước sông"}
        assert client.post("/api/v1/devices", json=sensor).status_code == 201
    page.goto(console.base_url + "/devices/sen-song-1")
    expect(page.get_by_role("heading", name="Số đo mới nhất")).to_be_visible()
    expect(page.get_by_text("Chưa có số đo.")).to_be_visible()
    expect(page.get_by_role("button", name="Thử loa")).to_have_count(0)  # a sensor takes no test tone
    expect(page.get_by_role("button", name="Khởi động lại…")).to_be_visible()

    # A forged call on another ward's device: unknown to this technician; another ward's area: forbidden.
    forged = page.evaluate(
        """async () => {
            const tries = [['POST', '/api/v1/operations', {type: 'test_tone', targets: {areas: ['hn.b']}}],
                           ['POST', '/api/v1/operations', {type: 'reboot', targets: {devices: ['spk-b1-1']}}],
                           ['POST', '/api/v1/devices/spk-b1-1/decommission']];
            const out = [];
            for (const [method, path, body] of tries) {
                out.push(await Wardcast.api(method, path, body).then(() => 'accepted', e => e.status));
            }
            return out;
        }"""
    )
    assert forged == [403, 404, 404]
    page.goto(console.base_url + "/devices/spk-b1-1")
    expect(page.get_by_role("heading", name="Không tìm thấy thiết bị")).to_be_visible()


def test_a_speaker_comes_online_live_and_a_test_tone_is_followed_to_its_end(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    sign_in(page, console.base_url, "kythuat.an")
    page.goto(console.base_url + "/devices")
    expect(page.locator("body")).to_have_attribute("data-live", "on")
    expect(row(page, "spk-a1-1")).to_have_attribute("data-status", "offline")
    with running_fleet(tmp_path / "fleet", console.broker, command_key=console.command_key):
        expect(row(page, "spk-a1-1")).to_have_attribute("data-status", "online", timeout=60_000)
        expect(row(page, "spk-a1-1").locator(".device-status")).to_have_text("Trực tuyến")
        page.locator("#filter-status").select_option("online")
        expect(page.locator("#devices-table tbody tr:visible")).to_have_count(len(WARD_A), timeout=60_000)

        row(page, "spk-a1-1").get_by_role("link", name="spk-a1-1").click()
        expect(page.get_by_role("heading", name="spk-a1-1")).to_be_visible()
        expect(page.locator("#device-status")).to_have_text("Trực tuyến")
        expect(page.locator("#availability tbody tr").first).to_contain_text("Trực tuyến")
        page.get_by_role("button", name="Thử loa").click()
        status = page.get_by_role("status").filter(has_text="Thử loa:")
        expect(status).to_have_attribute("data-state", "completed", timeout=30_000)
        expect(status).to_contain_text("đã gửi")
        expect(status).to_contain_text("hoàn tất (đã phát 3 s, tự kiểm tra: đạt)")
        expect(page.locator("#operations tbody tr").first).to_contain_text("Thử loa")
        expect(page.locator("#operations tbody tr").first).to_contain_text("hoàn tất")

        page.get_by_label("Âm lượng (0–100)").fill("150")
        page.get_by_role("button", name="Đặt âm lượng").click()
        expect(page.locator("#volume-form").get_by_role("alert")).to_contain_text(
            "Âm lượng (0–100) (params.volume):"
        )
        page.get_by_role("button", name="Khởi động lại…").click()
        expect(page.get_by_text("Khởi động lại thiết bị này ngay bây giờ?")).to_be_visible()
        page.get_by_role("button", name="Hủy").click()
        expect(page.get_by_text("Khởi động lại thiết bị này ngay bây giờ?")).to_be_hidden()
        screenshot(page, "tech-device-detail")

    # Decommissioning asks for the device's id typed out.
    page.goto(console.base_url + "/devices/spk-cho-1")
    button = page.get_by_role("button", name="Ngừng sử dụng", exact=True)
    expect(button).to_be_disabled()
    page.get_by_label("Gõ mã thiết bị (spk-cho-1) để xác nhận").fill("spk-cho")
    expect(button).to_be_disabled()
    page.get_by_label("Gõ mã thiết bị (spk-cho-1) để xác nhận").fill("spk-cho-1")
    button.click()
    expect(page.locator("#device-status")).to_have_text("Đã ngừng sử dụng")
    expect(page.get_by_role("button", name="Thử loa")).to_have_count(0)


def test_a_technician_approves_a_device_that_claims_itself(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    secret = secrets.token_bytes(32).hex()
    with console.client() as client:
        registered = client.post(
            "/api/v1/factory-secrets",
            content=f"serial,factory_secret\nSN-777,{secret}\n",
            headers={"Content-Type": "text/csv"},
        )
        assert registered.json() == {"registered": 1, "rejected": []}
    broker = console.broker
    device = subprocess.Popen(
        [
            *(sys.executable, "-m", "firmware_sim", "claim", "--mqtt-url", broker.url),
            *("--username", broker.claim.username, f"--password={broker.claim.password}"),
            *("--serial", "SN-777", "--factory-secret", secret),
            *("--bundle-out", str(tmp_path / "bundle.json"), "--timeout", "120"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert device.stdout is not None
        pending = device.stdout.readline()
        assert pending.startswith("PENDING "), pending
        sign_in(page, console.base_url, "kythuat.an")
        page.get_by_role("navigation", name="Điều hướng chính").get_by_role("link", name="Chờ duyệt").click()
        claim = page.locator(".claim", has_text="Số sê-ri SN-777")
        expect(claim).to_be_visible()
        claim.get_by_label("Địa bàn").select_option("hn.a.t3")
        claim.get_by_label("Tên").fill("Loa nhà văn hóa tổ 3")
        screenshot(page, "tech-claims")
        claim.get_by_role("button", name="Duyệt").click()
        expect(page.get_by_role("status")).to_contain_text(
            "Đã duyệt: thiết bị spk-sn-777 đã nhận gói cấu hình."
        )
        expect(claim).to_have_count(0)
        assert device.stdout.readline().strip() == "CLAIMED spk-sn-777"
        assert device.wait(timeout=30) == 0
    finally:
        if device.poll() is None:
            device.kill()
        device.communicate()
    assert json.loads((tmp_path / "bundle.json").read_text())["area"] == "hn.a.t3"
    page.goto(console.base_url + "/devices/spk-sn-777")
    expect(page.get_by_text("Loa nhà văn hóa tổ 3").first).to_be_visible()


def test_rollouts_show_their_progress_and_only_admins_act_on_them(console: ControllerHandle, page: Page):
    image = make_image("2.0.0")
    with console.client() as client:
        uploaded = upload_image(client, image, version="2.0.0", signature=FIRMWARE_KEY.sign(image))
        assert uploaded.status_code == 201, uploaded.text
        created = client.post(
            "/api/v1/rollouts",
            json={
                "name": "Loa 2.0 Phường An",
                "image_id": uploaded.json()["id"],
                "area": "hn.a",
                "groups": 2,
                "first_group": 1,
                "maintenance_window": None,
            },
        )
        assert created.status_code == 201, created.text

    sign_in(page, console.base_url, "kythuat.an")
    page.goto(console.base_url + "/rollouts")
    rollout = page.locator(".rollout", has_text="Loa 2.0 Phường An")
    expect(rollout.locator(".rollout-state")).to_have_text("đang chạy")
    expect(rollout.locator(".rollout-group")).to_have_count(2)
    expect(rollout.locator(".rollout-group").first).to_contain_text("Nhóm thử")
    expect(rollout.locator(".rollout-group").first.locator("td").nth(1)).to_have_text("1")
    expect(page.get_by_text("Bạn chỉ xem được tiến độ")).to_be_visible()
    expect(page.get_by_role("button", name="Tạm dừng")).to_have_count(0)
    expect(page.locator("#images tbody tr td")).to_contain_text(["Cụm loa", "2.0.0", "195.3 KB"])

    page.get_by_role("button", name="Đăng xuất").click()
    sign_in(page, console.base_url, "admin")
    page.goto(console.base_url + "/rollouts")
    rollout = page.locator(".rollout", has_text="Loa 2.0 Phường An")
    rollout.get_by_role("button", name="Tạm dừng").click()
    expect(page.locator("#rollout-result")).to_have_text("Loa 2.0 Phường An: tạm dừng")
    expect(rollout.locator(".rollout-state")).to_have_text("tạm dừng")
    expect(rollout.get_by_role("button", name="Tiếp tục")).to_be_visible()

    form = page.locator("#rollout-form")
    form.get_by_label("Tên đợt cập nhật").fill("Loa 2.0 Xã Bình")
    form.get_by_label("Chỉ trong địa bàn").select_option("hn.b")
    form.get_by_label("Khung bảo trì (HH:MM-HH:MM)").fill("25:00-04:00")
    form.get_by_role("button", name="Tạo đợt cập nhật").click()
    expect(form.get_by_role("alert")).to_contain_text("Khung bảo trì (HH:MM-HH:MM) (maintenance_window):")
    form.get_by_label("Bất kỳ lúc nào").check()
    form.get_by_role("button", name="Tạo đợt cập nhật").click()
    expect(page.locator("#rollout-result")).to_have_text("Đã tạo đợt cập nhật Loa 2.0 Xã Bình")
    second = page.locator(".rollout", has_text="Loa 2.0 Xã Bình")
    expect(second.locator(".rollout-state")).to_have_text("đang chạy")
    screenshot(page, "tech-rollouts")


def test_ward_staff_may_not_open_the_technician_pages(console: ControllerHandle, page: Page):
    sign_in(page, console.base_url, "canbo.an")
    for path in ("/devices", "/devices/spk-a1-1", "/claims", "/rollouts"):
        response = page.goto(console.base_url + path)
        assert response is not None and response.status == 403, path
        expect(page.get_by_role("heading", name="Không có quyền")).to_be_visible()
