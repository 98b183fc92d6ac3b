import re
import unicodedata
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from controller.domain.areas import AreaTree
from controller.domain.demo import (
    DEMO_CENTRE_LAT,
    DEMO_CENTRE_LON,
    DEMO_RADIUS_KM,
    DemoDataError,
    DemoDevice,
    SensorMetric,
    distance_from_centre_km,
    haversine_km,
    load_demo_city,
    load_demo_fleet,
    parse_demo_city,
    parse_demo_fleet,
)
from controller.settings import CONFIG_ENV_VAR, load_settings

EXPECTED_UNITS = {
    "01834": ("Phường Nguyễn Thị Minh Khai", "ward"),
    "01837": ("Phường Sông Cầu", "ward"),
    "01840": ("Phường Đức Xuân", "ward"),
    "01843": ("Phường Phùng Chí Kiên", "ward"),
    "01846": ("Phường Huyền Tụng", "ward"),
    "01849": ("Xã Dương Quang", "commune"),
    "01852": ("Xã Nông Thượng", "commune"),
    "01855": ("Phường Xuất Hóa", "ward"),
}
VIETNAMESE_DIACRITICS = re.compile(
    r"[ăâđêôơưàáảãạằắẳẵặầấẩẫậèéẻẽẹềếểễệìíỉĩịòóỏõọồốổỗộờớởỡợùúủũụừứửữựỳýỷỹỵ]", re.IGNORECASE
)


@pytest.fixture(scope="module")
def city() -> AreaTree:
    return AreaTree(load_demo_city())


@pytest.fixture(scope="module")
def fleet() -> list[DemoDevice]:
    return load_demo_fleet()


def unit_by_admin_code(city: AreaTree, admin_code: str) -> str:
    (code,) = [area.code for area in city if area.admin_code == admin_code]
    return code


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo_city.yaml", "demo_fleet.yaml"])
def test_data_files_are_packaged_nfc_utf8(name: str) -> None:
    text = resources.files("controller").joinpath("data", name).read_bytes().decode("utf-8")
    assert unicodedata.is_normalized("NFC", text)
    assert not text.startswith("\ufeff")


def test_loaders_return_fresh_lists() -> None:
    first = load_demo_city()
    first.clear()
    assert load_demo_city()
    devices = load_demo_fleet()
    devices.clear()
    assert load_demo_fleet()


# --- city -------------------------------------------------------------------------------------------


def test_city_is_a_single_tree_rooted_at_bac_kan(city: AreaTree) -> None:
    (root,) = city.roots()
    assert (root.code, root.name, root.kind, root.admin_code) == ("bk", "Thành phố Bắc Kạn", "city", "058")
    assert (root.lat, root.lon) == (DEMO_CENTRE_LAT, DEMO_CENTRE_LON)


def test_city_has_its_eight_units_with_official_codes(city: AreaTree) -> None:
    units = city.children("bk")
    assert {unit.admin_code: (unit.name, unit.kind) for unit in units} == EXPECTED_UNITS
    assert Counter(area.kind for area in city) == {"city": 1, "ward": 6, "commune": 2, "group": 32}


def test_every_unit_has_three_to_five_residential_groups(city: AreaTree) -> None:
    for unit in city.children("bk"):
        groups = city.children(unit.code)
        assert 3 <= len(groups) <= 5, unit.code
        for group in groups:
            assert group.kind == "group"
            assert city.children(group.code) == ()
            assert group.code.startswith(unit.code + ".")
            if unit.kind == "ward":
                assert re.fullmatch(r"Tổ dân phố \d+", group.name), group.name
            else:
                assert group.name.startswith("Thôn "), group.name


def test_area_codes_are_short_ascii_slugs(city: AreaTree) -> None:
    for area in city:
        assert re.fullmatch(r"bk(\.[a-z0-9]+){0,2}", area.code), area.code


def test_names_are_nfc_with_vietnamese_diacritics(city: AreaTree, fleet: list[DemoDevice]) -> None:
    names = [area.name for area in city] + [device.name for device in fleet]
    assert all(unicodedata.is_normalized("NFC", name) for name in names)
    assert all(name == name.strip() and name for name in names)
    assert all(VIETNAMESE_DIACRITICS.search(name) for name in names)
    assert "Phường Xuất Hóa" in {area.name for area in city}


def test_every_area_has_coordinates_within_the_radius(city: AreaTree) -> None:
    for area in city:
        assert area.lat is not None
        assert area.lon is not None
        assert distance_from_centre_km(area.lat, area.lon) <= DEMO_RADIUS_KM


def test_groups_cluster_around_their_unit(city: AreaTree) -> None:
    for unit in city.children("bk"):
        assert unit.lat is not None
        assert unit.lon is not None
        for group in city.children(unit.code):
            assert group.lat is not None
            assert group.lon is not None
            assert haversine_km(unit.lat, unit.lon, group.lat, group.lon) <= 2.0, group.code


@pytest.mark.parametrize(
    ("admin_code", "north", "east"),
    [
        ("01843", True, None),  # Phùng Chí Kiên: north
        ("01846", True, True),  # Huyền Tụng: north-east
        ("01855", False, True),  # Xuất Hóa: south-east
        ("01849", False, False),  # Dương Quang: south-west
        ("01852", None, False),  # Nông Thượng: west
        ("01834", None, False),  # Nguyễn Thị Minh Khai: central-west
    ],
)
def test_units_lie_where_they_are_on_the_map(
    city: AreaTree, admin_code: str, north: bool | None, east: bool | None
) -> None:
    unit = city.get(unit_by_admin_code(city, admin_code))
    assert unit.lat is not None
    assert unit.lon is not None
    if north is not None:
        assert (unit.lat > DEMO_CENTRE_LAT) == north
    if east is not None:
        assert (unit.lon > DEMO_CENTRE_LON) == east


def test_central_wards_are_central(city: AreaTree) -> None:
    for admin_code in ("01837", "01840"):
        unit = city.get(unit_by_admin_code(city, admin_code))
        assert unit.lat is not None
        assert unit.lon is not None
        assert distance_from_centre_km(unit.lat, unit.lon) <= 1.5


# --- fleet ------------------------------------------------------------------------------------------


def test_fleet_counts_by_kind(fleet: list[DemoDevice]) -> None:
    assert Counter(device.kind for device in fleet) == {
        "speaker": 56,
        "led_screen": 5,
        "sensor": 7,
        "wired_zone": 1,
    }
    assert Counter(device.transport for device in fleet) == {"mqtt": 66, "modbus": 1, "coap": 1, "serial": 1}


def test_device_ids_are_unique_and_addresses_are_ids(fleet: list[DemoDevice]) -> None:
    assert len({device.id for device in fleet}) == len(fleet)
    # A CoAP sensor's address is where it answers; every other device's is its id.
    assert all(device.address == device.id for device in fleet if device.transport != "coap")


def test_every_device_is_in_a_known_area_within_the_radius(city: AreaTree, fleet: list[DemoDevice]) -> None:
    for device in fleet:
        assert device.area in city
        assert distance_from_centre_km(device.lat, device.lon) <= DEMO_RADIUS_KM


def test_every_group_has_one_to_three_speakers_near_it(city: AreaTree, fleet: list[DemoDevice]) -> None:
    speakers = [device for device in fleet if device.kind == "speaker"]
    per_group = Counter(device.area for device in speakers)
    groups = [area for area in city if area.kind == "group"]
    assert set(per_group) == {group.code for group in groups}
    assert all(1 <= count <= 3 for count in per_group.values())
    assert set(per_group.values()) == {1, 2, 3}
    for speaker in speakers:
        group = city.get(speaker.area)
        unit = city.get(group.parent_code or "")
        assert group.lat is not None
        assert group.lon is not None
        assert haversine_km(group.lat, group.lon, speaker.lat, speaker.lon) <= 0.5
        group_slug = group.code.rsplit(".", 1)[1]
        unit_slug = unit.code.rsplit(".", 1)[1]
        assert re.fullmatch(rf"spk-{unit_slug}-{group_slug}-[1-3]", speaker.id), speaker.id
        assert speaker.metrics == ()


def test_led_screens_stand_at_the_named_junctions(city: AreaTree, fleet: list[DemoDevice]) -> None:
    screens = [device for device in fleet if device.kind == "led_screen" and device.transport == "mqtt"]
    assert len(screens) == 4
    assert all(city.get(screen.area).kind == "ward" and screen.metrics == () for screen in screens)
    names = " | ".join(screen.name for screen in screens)
    assert "Trường Chinh – Trần Hưng Đạo" in names
    assert "Phiêng Luông" in names


def test_sensors_measure_the_river_and_the_air(fleet: list[DemoDevice]) -> None:
    sensors = [device for device in fleet if device.kind == "sensor"]
    metrics = Counter(metric for sensor in sensors for metric in sensor.metrics)
    assert metrics[SensorMetric("water_level", "m")] >= 2
    assert metrics[SensorMetric("pm2_5", "µg/m³")] == 2
    assert all(
        "sông Cầu" in sensor.name
        for sensor in sensors
        if SensorMetric("water_level", "m") in sensor.metrics and sensor.transport == "mqtt"
    )


# --- validation -------------------------------------------------------------------------------------


def fleet_issues(text: str, city: AreaTree) -> list[tuple[str, str]]:
    with pytest.raises(DemoDataError) as error:
        parse_demo_fleet(text.encode(), city)
    return [(issue.field, issue.message) for issue in error.value.issues]


GOOD_SPEAKER = (
    "{id: spk-a, kind: speaker, area: bk.songcau.t01, name: Loa, lat: 22.15, lon: 105.83, "
    "transport: mqtt, address: spk-a}"
)


def test_fleet_parser_accepts_a_good_device(city: AreaTree) -> None:
    (device,) = parse_demo_fleet(f"devices: [{GOOD_SPEAKER}]".encode(), city)
    assert device == DemoDevice("spk-a", "speaker", "bk.songcau.t01", "Loa", 22.15, 105.83, "mqtt", "spk-a")


@pytest.mark.parametrize(
    ("replacement", "field", "fragment"),
    [
        ("area: bk.songcau.t01", "area: bk.nowhere", "no area"),
        ("kind: speaker", "kind: siren", "must be one of"),
        ("transport: mqtt", "transport: zigbee", "must be one of"),
        ("lat: 22.15", "lat: 22.5", "km from the demo centre"),
        ("lat: 22.15", "lat: 382.15", "between -90 and 90"),
        ("lon: 105.83", "lon: .nan", "decimal degrees"),
        ("name: Loa", "name: ''", "required"),
        ("id: spk-a", "id: 'spk a'", "ASCII"),
        ("address: spk-a", "address: spk-a, volume: 3", "unknown key"),
        ("address: spk-a", "address: spk-a, metrics: [{metric: noise, unit: dB}]", "only sensors"),
    ],
)
def test_fleet_parser_names_the_bad_field(
    city: AreaTree, replacement: str, field: str, fragment: str
) -> None:
    bad = GOOD_SPEAKER.replace(replacement, field)
    ((where, message),) = fleet_issues(f"devices: [{bad}]", city)
    assert where.startswith("devices[0].")
    assert fragment in message


def test_fleet_parser_requires_sensor_metrics(city: AreaTree) -> None:
    sensor = GOOD_SPEAKER.replace("kind: speaker", "kind: sensor")
    assert fleet_issues(f"devices: [{sensor}]", city)[0][0] == "devices[0].metrics"
    broken = sensor.replace("}", ", metrics: [{metric: water_level}]}")
    assert fleet_issues(f"devices: [{broken}]", city)[0][0] == "devices[0].metrics[0]"


def test_fleet_parser_rejects_duplicate_ids_and_garbage(city: AreaTree) -> None:
    issues = fleet_issues(f"devices: [{GOOD_SPEAKER}, {GOOD_SPEAKER}, 7]", city)
    assert [field for field, _ in issues] == ["devices[1].id", "devices[2]"]
    assert fleet_issues("devices: 3", city)[0][0] == "devices"
    assert fleet_issues("devices: [", city)[0][0] == "file"
    with pytest.raises(DemoDataError):
        parse_demo_fleet(b"\xff", city)


def test_city_parser_rejects_far_away_areas() -> None:
    text = "areas: [{code: hn, name: Hà Nội, kind: city, lat: 21.03, lon: 105.85}]"
    with pytest.raises(DemoDataError) as error:
        parse_demo_city(text.encode())
    (issue,) = error.value.issues
    assert (issue.field, issue.code) == ("lat", "hn")
    assert "km from the demo centre" in issue.message


def test_haversine() -> None:
    assert haversine_km(22.0, 105.0, 22.0, 105.0) == 0.0
    assert haversine_km(22.0, 105.0, 23.0, 105.0) == pytest.approx(111.19, abs=0.01)
    assert haversine_km(21.03, 105.85, 22.147, 105.834) == pytest.approx(
        haversine_km(22.147, 105.834, 21.03, 105.85)
    )
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(20015.1, abs=0.1)


def test_the_shipped_config_s_alert_templates_and_map_fit_the_demo_city(
    city: AreaTree, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(CONFIG_ENV_VAR, "")  # load_settings sets it: restored after the test
    settings = load_settings(Path(__file__).parent.parent / "config.yaml")
    assert settings.alerts.templates, "the emergency panel offers the demo city's templates"
    for name, template in settings.alerts.templates.items():
        for code in template.targets.areas:
            assert code in city, f"alerts.templates.{name}.targets.areas: {code} is not in the demo city"
        assert VIETNAMESE_DIACRITICS.search(template.text), name
    map_centre = settings.console.map
    assert distance_from_centre_km(map_centre.center_lat, map_centre.center_lon) < 2
