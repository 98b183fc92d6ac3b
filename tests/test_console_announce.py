"""The staff's main flow in a real browser: a ward's culture staff schedules a recurring announcement
read by the Vietnamese TTS for one residential group, listens to it, sees a clash before saving, saves,
finds it in the calendar week and sees it turn to played when the group's simulated speakers play it;
another ward stays out of sight and out of reach. An operator draws the target area on the map.
Screenshots: announce-new, announce-conflict, calendar-week, announce-map (desktop and phone)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Page, expect

from controller.console.announce import entry_status, parse_week
from tests.support.console import create_user, screenshot, seeded_controller, sign_in
from tests.support.scenario import place_speakers, running_fleet, upload
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")
TEXT = "Thông báo: ngày mai phun thuốc muỗi tại tổ dân phố 1"
RRULE_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    with seeded_controller(tmp_path_factory.mktemp("announce")) as handle:
        create_user(handle, "canbo.an", "ward_staff", "hn.a")
        create_user(handle, "dieuhanh", "operator")
        yield handle


def test_ward_staff_schedules_a_recurring_tts_announcement_sees_the_clash_and_then_it_played(
    console: ControllerHandle, page: Page, tmp_path: Path
):
    base = console.base_url
    tomorrow = datetime.now(HANOI).date() + timedelta(days=1)
    with console.client() as client:  # an evening bulletin the ward already has for group 1
        existing = client.post(
            "/api/v1/schedules",
            json={
                "name": "Bản tin tối",
                "targets": {"areas": ["hn.a.t1"]},
                "content": {"media_ids": [upload(console, 0.5)]},
                "dtstart": f"{tomorrow.isoformat()}T19:00",
                "rrule": "FREQ=DAILY",
            },
        )
        assert existing.status_code == 201, existing.text

    with running_fleet(tmp_path / "fleet", console.broker, command_key=console.command_key) as fleet:
        sign_in(page, base, "canbo.an")
        page.goto(base + "/announcements/new")
        expect(page.get_by_role("heading", name="Thông báo mới", exact=True)).to_be_visible()
        # Only the staff's own ward; no emergency class, no map drawing.
        expect(page.locator(".target-tree .area-name")).to_have_text(
            ["Phường An", "Tổ dân phố 1", "Tổ dân phố 2", "Tổ dân phố 3"]
        )
        expect(page.locator(".target-tree .device-count").nth(1)).to_have_text("(2 cụm loa)")
        expect(page.get_by_text("Xã Bình")).to_have_count(0)
        expect(page.locator('#priority option[value="emergency"]')).to_have_count(0)
        expect(page.locator("#draw")).to_have_count(0)

        page.get_by_label("Tên thông báo").fill("Phun thuốc muỗi tổ 1")
        page.locator('[id="area-hn.a.t1"]').check()
        page.get_by_label("Văn bản cần đọc").fill(TEXT)
        page.get_by_role("button", name="Nghe thử").click()
        expect(page.locator("#listen-status")).to_contain_text("Bản nghe thử dài")
        page.wait_for_function("document.getElementById('tts-audio').duration > 0")
        assert page.eval_on_selector("#tts-audio", "audio => audio.currentSrc").startswith("blob:")

        # Weekly on the day chosen, at the evening bulletin's time: the clash shows before saving.
        day_code = RRULE_DAYS[tomorrow.weekday()]
        page.get_by_label("Từ ngày").fill(tomorrow.isoformat())
        for code in RRULE_DAYS:
            page.locator(f"#day-{code}").set_checked(code == day_code)
        page.get_by_label("Giờ phát 1").fill("19:00:00")
        expect(page.locator("#rrule-text")).to_contain_text(f"FREQ=WEEKLY;BYDAY={day_code};UNTIL=")
        expect(page.locator("#rule-summary")).to_contain_text("Hằng tuần vào")
        expect(page.locator("#rule-summary")).to_contain_text("lúc 19:00")
        screenshot(page, "announce-new")
        page.get_by_role("button", name="Kiểm tra trùng lịch").click()
        clash = page.locator(".clash")
        expect(clash).to_have_count(1)
        expect(clash).to_contain_text("Lịch: Bản tin tối")
        expect(clash).to_contain_text("spk-a1-1, spk-a1-2")
        expect(clash).to_contain_text("Cùng mức ưu tiên: hãy chọn giờ khác.")
        expect(page.get_by_role("alert")).to_contain_text("Trùng lịch với 1 lịch khác")
        screenshot(page, "announce-conflict")

        # Saving anyway is refused by the API with the same clash (nothing stored).
        page.get_by_role("button", name="Lưu thông báo").click()
        expect(page.locator("#saved")).to_be_hidden()
        expect(clash).to_have_count(1)

        # A time a few seconds ahead, today, every day: no clash, saved, and it plays.
        soon = datetime.now(HANOI).replace(microsecond=0) + timedelta(seconds=25)  # time to fill and save
        page.get_by_label("Tần suất").select_option("DAILY")
        page.get_by_label("Từ ngày").fill(soon.date().isoformat())
        page.get_by_label("Giờ phát 1").fill(soon.strftime("%H:%M:%S"))
        expect(page.locator("#rrule-text")).to_contain_text("FREQ=DAILY;UNTIL=")
        page.get_by_role("button", name="Kiểm tra trùng lịch").click()
        expect(page.locator("#check-result")).to_contain_text("Không trùng lịch. Phát tới 2 cụm loa.")
        page.get_by_role("button", name="Lưu thông báo").click()
        expect(page.locator("#saved")).to_contain_text("Đã lưu 1 lịch phát.")
        page.get_by_role("link", name="Xem trên lịch phát").click()

        expect(page.get_by_role("heading", name="Lịch phát", exact=True)).to_be_visible()
        column = page.locator(f'.day-column[data-date="{soon.date().isoformat()}"]')
        entry = column.locator(".entry", has_text="Phun thuốc muỗi tổ 1")
        expect(entry).to_have_count(1)
        expect(entry.locator("time")).to_have_text(soon.strftime("%H:%M:%S"))
        expect(entry).to_have_attribute("data-status", "played", timeout=60_000)
        expect(entry.locator(".entry-status")).to_have_text("Đã phát: 2/2 cụm loa")
        played = {p["address"] for p in fleet.plays() if p["event"] == "playing"}
        assert played == {"a1-1", "a1-2"}
        # The evening bulletin is in the week too (from tomorrow), upcoming.
        expect(page.locator(".entry", has_text="Bản tin tối").first).to_have_attribute(
            "data-status", "upcoming"
        )
        screenshot(page, "calendar-week")

    # Another ward: not in the calendar's choices, its calendar refused, the API refuses forged calls.
    expect(page.locator("#calendar-area option")).to_have_text(
        ["Phường An", *(f"\u00a0\u00a0Tổ dân phố {n}" for n in (1, 2, 3))]
    )
    assert page.request.get(base + "/calendar?area=hn.b").status == 403
    forged = page.evaluate(
        """Wardcast.api('POST', '/api/v1/schedules', {name: 'x', targets: {areas: ['hn.b.t1']},
            content: {tts: 'Xin chào'}, dtstart: '2031-01-01T06:00'}).catch(e => [e.status, e.field])"""
    )
    assert forged == [403, "targets.areas[0]"]
    programme = page.evaluate(
        """Wardcast.api('GET', '/api/v1/areas/hn.b/programme?start=2031-01-01T00:00:00%2B07:00'
            + '&end=2031-01-02T00:00:00%2B07:00').catch(e => [e.status, e.field])"""
    )
    assert programme == [403, "code"]
    page.goto(base + "/calendar?lang=en")
    expect(page.get_by_role("heading", name="Calendar", exact=True)).to_be_visible()
    expect(page.locator(".entry-name").first).to_contain_text("Phun thuốc muỗi tổ 1")  # data as it is


def test_an_operator_draws_the_area_on_the_map(console: ControllerHandle, page: Page):
    place_speakers(console)
    sign_in(page, console.base_url, "dieuhanh")
    page.goto(console.base_url + "/announcements/new")
    expect(page.locator('#priority option[value="emergency"]')).to_have_count(1)
    # The point-in-polygon test the page uses (even-odd ray casting).
    square = [[0, 0], [0, 2], [2, 2], [2, 0]]
    notched = [[0, 0], [0, 4], [4, 4], [4, 0], [2, 2]]  # concave: a triangle cut in from the lon=0 side
    cases = [
        ([1, 1], square, True),
        ([3, 1], square, False),
        ([1, 0.5], square, True),
        ([3, 3], notched, True),
        ([2, 3], notched, True),
        ([2, 1], notched, False),
        ([5, 2], notched, False),
    ]
    found = page.evaluate(
        "cases => cases.map(([point, polygon]) => Wardcast.pointInPolygon(point, polygon))",
        [[point, polygon] for point, polygon, _ in cases],
    )
    assert found == [inside for _, _, inside in cases]
    page.get_by_text("Hoặc vẽ vùng trên bản đồ").click()
    markers = page.locator("path.device-marker")
    expect(markers).to_have_count(8)
    page.locator("#draw-map").scroll_into_view_if_needed()
    box = page.locator("path.device-spk-a1-1").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for dx, dy in ((-20, -20), (20, -20), (20, 20), (-20, 20)):
        page.mouse.click(x + dx, y + dy)
    expect(page.locator("#polygon-status")).to_have_text("Số đỉnh: 4")
    page.get_by_role("button", name="Khép vùng").click()
    expect(page.locator("#polygon-status")).to_have_text("Cụm loa trong vùng: 2")
    assert page.input_value("#polygon-devices") == "spk-a1-1,spk-a1-2"
    page.get_by_label("Tên thông báo").fill("Vùng vẽ tay")
    page.get_by_label("Văn bản cần đọc").fill("Kiểm tra vùng vẽ trên bản đồ")
    page.get_by_role("button", name="Kiểm tra trùng lịch").click()
    expect(page.locator("#check-result")).to_contain_text("Không trùng lịch. Phát tới 2 cụm loa.")
    screenshot(page, "announce-map")


def test_calendar_statuses_and_weeks():
    now = datetime(2026, 12, 1, 6, 0, tzinfo=HANOI)
    fired = {"outcome": "fired", "devices": 2, "played": 2, "playing": 0, "pending": 0}
    assert entry_status(None, now + timedelta(seconds=1), now) == "upcoming"
    assert entry_status(None, now, now) == "due"
    assert entry_status(fired, now, now) == "played"
    assert entry_status({**fired, "played": 1}, now, now) == "partial"
    assert entry_status({**fired, "played": 0}, now, now) == "not_played"
    assert entry_status({**fired, "played": 1, "playing": 1}, now, now) == "playing"
    assert entry_status({**fired, "played": 0, "pending": 2}, now, now) == "pending"
    assert entry_status({**fired, "devices": 0, "played": 0}, now, now) == "none"
    assert entry_status({"outcome": "missed", "devices": None}, now, now) == "missed"
    assert entry_status({"outcome": "failed", "devices": None}, now, now) == "failed"
    assert parse_week("2026-12-03", date(2026, 1, 1)) == date(2026, 11, 30)
    assert parse_week("not a date", date(2026, 12, 6)) == date(2026, 11, 30)
    assert parse_week(None, date(2026, 12, 7)) == date(2026, 12, 7)
