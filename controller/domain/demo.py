"""The demo city (Bắc Kạn) and its device fleet, read from the package's data files.

Pure apart from reading the packaged files. The loaders validate the data as strictly as any import:
the demo is what a new user sees first, so a broken data file must fail loudly, naming the entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final, Literal, TypeVar, get_args

import yaml

from controller.domain.area_import import parse_areas
from controller.domain.areas import (
    CODE_PATTERN,
    LATITUDE_LIMIT,
    LONGITUDE_LIMIT,
    Area,
    AreaError,
    AreaTree,
    Issue,
    normalise_name,
)

DeviceKind = Literal["speaker", "led_screen", "sensor", "wired_zone"]
DemoTransport = Literal["mqtt", "modbus", "coap", "serial"]

DEVICE_KINDS: Final[tuple[str, ...]] = get_args(DeviceKind)
DEMO_CENTRE_LAT: Final[float] = 22.147
DEMO_CENTRE_LON: Final[float] = 105.834
DEMO_RADIUS_KM: Final[float] = 10.0
EARTH_RADIUS_KM: Final[float] = 6371.0088
DEMO_CITY_FILE: Final[str] = "demo_city.yaml"
DEMO_FLEET_FILE: Final[str] = "demo_fleet.yaml"

_Problem = Callable[[str, str], None]
_Choice = TypeVar("_Choice", bound=str)

# Literal-typed lookups, so that a checked string becomes a `DeviceKind` without a cast.
_KIND_BY_NAME: Final[dict[str, DeviceKind]] = {
    "speaker": "speaker",
    "led_screen": "led_screen",
    "sensor": "sensor",
    "wired_zone": "wired_zone",
}
_TRANSPORT_BY_NAME: Final[dict[str, DemoTransport]] = {
    "mqtt": "mqtt",
    "modbus": "modbus",
    "coap": "coap",
    "serial": "serial",
}
_DEVICE_KEYS: Final[frozenset[str]] = frozenset(
    {"id", "kind", "area", "name", "lat", "lon", "transport", "address", "metrics", "config"}
)


@dataclass(frozen=True, slots=True)
class SensorMetric:
    metric: str
    unit: str


@dataclass(frozen=True, slots=True)
class DemoDevice:
    id: str
    kind: DeviceKind
    area: str
    name: str
    lat: float
    lon: float
    transport: DemoTransport
    address: str
    metrics: tuple[SensorMetric, ...] = ()
    # Transport settings passed to the API as they are (a Modbus link, a serial line, …): it checks them.
    config: Mapping[str, Any] = field(default_factory=dict)


class DemoDataError(AreaError):
    """The packaged demo data is inconsistent; `issues` name the entries (e.g. `devices[3].area`)."""

    error_name = "invalid_demo_data"


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres on a spherical Earth (error < 0.5 %, ample for 10 km)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dphi = (phi2 - phi1) / 2
    half_dlambda = math.radians(lon2 - lon1) / 2
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def distance_from_centre_km(lat: float, lon: float) -> float:
    return haversine_km(DEMO_CENTRE_LAT, DEMO_CENTRE_LON, lat, lon)


def load_demo_city() -> list[Area]:
    """The demo city's areas, parents before children; a fresh list on every call."""
    return list(_demo_city())


def load_demo_fleet() -> list[DemoDevice]:
    """The demo fleet, checked against the demo city; a fresh list on every call."""
    return list(_demo_fleet())


def parse_demo_city(data: bytes) -> list[Area]:
    """Parse a demo city file: an area import that must form a tree with every point near the centre."""
    areas = parse_areas(data, "yaml")
    AreaTree(areas)
    issues = [
        Issue("lat", _too_far_message(area.lat, area.lon), code=area.code)
        for area in areas
        if area.lat is not None and area.lon is not None and not _is_near_centre(area.lat, area.lon)
    ]
    if issues:
        raise DemoDataError(issues)
    return areas


def parse_demo_fleet(data: bytes, tree: AreaTree) -> list[DemoDevice]:
    """Parse a fleet file `devices: [{id, kind, area, name, lat, lon, transport, address, metrics?}]`.

    Every device must sit in an area of `tree`, within `DEMO_RADIUS_KM` of the centre, with a unique id;
    sensors must list their metrics and nothing else may. All issues are raised together.
    """
    try:
        document: object = yaml.safe_load(data.decode("utf-8"))
    except (ValueError, yaml.YAMLError) as error:
        raise DemoDataError([Issue("file", f"is not a readable UTF-8 YAML file: {error}")]) from error
    if not isinstance(document, dict) or not isinstance(document.get("devices"), list):
        raise DemoDataError([Issue("devices", "expected a mapping with a 'devices' list")])

    devices: list[DemoDevice] = []
    issues: list[Issue] = []
    first_index_by_id: dict[str, int] = {}
    for index, entry in enumerate(document["devices"]):
        device = _read_device(entry, f"devices[{index}]", tree, issues)
        if device is None:
            continue
        earlier = first_index_by_id.setdefault(device.id, index)
        if earlier != index:
            issues.append(
                Issue(f"devices[{index}].id", f"duplicate id {device.id!r}; first at devices[{earlier}]")
            )
            continue
        devices.append(device)
    if issues:
        raise DemoDataError(issues)
    return devices


@cache
def _demo_city() -> tuple[Area, ...]:
    return tuple(parse_demo_city(_read_data_file(DEMO_CITY_FILE)))


@cache
def _demo_fleet() -> tuple[DemoDevice, ...]:
    return tuple(parse_demo_fleet(_read_data_file(DEMO_FLEET_FILE), AreaTree(_demo_city())))


def _read_data_file(name: str) -> bytes:
    return resources.files("controller").joinpath("data", name).read_bytes()


def _is_near_centre(lat: float, lon: float) -> bool:
    return distance_from_centre_km(lat, lon) <= DEMO_RADIUS_KM


def _too_far_message(lat: float, lon: float) -> str:
    distance = distance_from_centre_km(lat, lon)
    return (
        f"({lat}, {lon}) is {distance:.1f} km from the demo centre "
        f"({DEMO_CENTRE_LAT}, {DEMO_CENTRE_LON}); the limit is {DEMO_RADIUS_KM:g} km"
    )


def _read_device(entry: object, path: str, tree: AreaTree, issues: list[Issue]) -> DemoDevice | None:
    if not isinstance(entry, dict):
        issues.append(Issue(path, "must be a mapping"))
        return None
    found: list[Issue] = []

    def problem(key: str, message: str) -> None:
        found.append(Issue(f"{path}.{key}", message))

    found.extend(
        Issue(f"{path}.{key}", "unknown key; expected some of " + ", ".join(sorted(_DEVICE_KEYS)))
        for key in entry
        if key not in _DEVICE_KEYS
    )
    device_id = _text(entry, "id", problem)
    if device_id is not None and not CODE_PATTERN.fullmatch(device_id):
        problem("id", f"{device_id!r} must be 1-64 ASCII letters, digits, '_', '.' or '-'")
    kind = _choice(entry, "kind", _KIND_BY_NAME, problem)
    area = _text(entry, "area", problem)
    if area is not None and area not in tree:
        problem("area", f"no area with code {area!r} in the demo city")
    name = _text(entry, "name", problem)
    if name is not None:
        name = normalise_name(name)
    transport = _choice(entry, "transport", _TRANSPORT_BY_NAME, problem)
    address = _text(entry, "address", problem)
    lat = _coordinate(entry, "lat", LATITUDE_LIMIT, problem)
    lon = _coordinate(entry, "lon", LONGITUDE_LIMIT, problem)
    if lat is not None and lon is not None and not _is_near_centre(lat, lon):
        problem("lat", _too_far_message(lat, lon))
    metrics = _metrics(entry.get("metrics"), kind, problem)
    config = entry.get("config", {})
    if not isinstance(config, dict):
        problem("config", "must be a mapping of transport settings")
        config = {}

    if (
        found
        or device_id is None
        or kind is None
        or area is None
        or name is None
        or transport is None
        or address is None
        or lat is None
        or lon is None
    ):
        issues.extend(found)
        return None
    return DemoDevice(
        id=device_id,
        kind=kind,
        area=area,
        name=name,
        lat=lat,
        lon=lon,
        transport=transport,
        address=address,
        metrics=metrics,
        config=config,
    )


def _text(entry: dict[object, object], key: str, problem: _Problem) -> str | None:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        problem(key, "is required text")
        return None
    return value.strip()


def _choice(
    entry: dict[object, object], key: str, allowed: Mapping[str, _Choice], problem: _Problem
) -> _Choice | None:
    value = _text(entry, key, problem)
    if value is None:
        return None
    choice = allowed.get(value)
    if choice is None:
        problem(key, f"must be one of {', '.join(allowed)}; got {value!r}")
    return choice


def _coordinate(entry: dict[object, object], key: str, limit: float, problem: _Problem) -> float | None:
    value = entry.get(key)
    # The range check matters beyond tidiness: the haversine formula is periodic, so a latitude off by
    # 360 degrees would otherwise pass as "near the centre".
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not -limit <= value <= limit
    ):
        problem(key, f"is required as a number in decimal degrees between {-limit:g} and {limit:g}")
        return None
    return float(value)


def _metrics(raw: object, kind: DeviceKind | None, problem: _Problem) -> tuple[SensorMetric, ...]:
    if kind != "sensor":
        if raw is not None:
            problem("metrics", "only sensors report metrics")
        return ()
    if not isinstance(raw, list) or not raw:
        problem("metrics", "a sensor must list its metrics, e.g. [{metric: water_level, unit: m}]")
        return ()
    metrics: list[SensorMetric] = []
    for index, item in enumerate(raw):
        metric = item.get("metric") if isinstance(item, dict) else None
        unit = item.get("unit") if isinstance(item, dict) else None
        if not isinstance(metric, str) or not metric or not isinstance(unit, str) or not unit:
            problem(f"metrics[{index}]", "must be a mapping {metric: <name>, unit: <unit>}")
            continue
        metrics.append(SensorMetric(metric, unit))
    return tuple(metrics)
