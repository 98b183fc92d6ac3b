"""Geographic targets: polygon and circle validation, and which devices fall inside."""

import math
import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from controller.domain.cap import CapCircle
from controller.domain.geo import (
    MAX_CIRCLE_RADIUS_M,
    DevicePoint,
    GeoCircle,
    GeoError,
    GeoPolygon,
    LonLat,
    devices_in,
    haversine_m,
)

# WGS 84, to check distances against the ellipsoid rather than against the sphere the code uses.
WGS84_A = 6_378_137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)


def meridian_radius_m(lat: float) -> float:
    """M: radius of curvature along a meridian (north–south)."""
    return WGS84_A * (1 - WGS84_E2) / (1 - WGS84_E2 * math.sin(math.radians(lat)) ** 2) ** 1.5


def prime_vertical_radius_m(lat: float) -> float:
    """N: radius of curvature east–west; a parallel has radius N·cos(lat)."""
    return WGS84_A / math.sqrt(1 - WGS84_E2 * math.sin(math.radians(lat)) ** 2)


def metres_north(lat: float, degrees: float) -> float:
    return meridian_radius_m(lat + degrees / 2) * math.radians(degrees)


def metres_east(lat: float, degrees: float) -> float:
    return prime_vertical_radius_m(lat) * math.cos(math.radians(lat)) * math.radians(degrees)


def geojson(*rings: list[tuple[float, float]]) -> dict[str, object]:
    return {"type": "Polygon", "coordinates": [[list(position) for position in ring] for ring in rings]}


def box(west: float, south: float, east: float, north: float) -> list[tuple[float, float]]:
    """A closed counter-clockwise ring of (lon, lat) positions."""
    return [(west, south), (east, south), (east, north), (west, north), (west, south)]


# --- Selecting devices ----------------------------------------------------------------------------

CLUSTERS = {"a": (21.00, 105.80), "b": (21.05, 105.85), "c": (21.10, 105.90)}
OFFSETS = [(0.0, 0.0), (0.002, 0.0), (-0.002, 0.0), (0.0, 0.002), (0.0, -0.002)]


def cluster_devices() -> list[DevicePoint]:
    return [
        DevicePoint(f"{name}{index}", lat + d_lat, lon + d_lon)
        for index, (d_lat, d_lon) in enumerate(OFFSETS)
        for name, (lat, lon) in CLUSTERS.items()
    ]


def test_polygon_covering_two_clusters_selects_exactly_them():
    devices = cluster_devices()
    polygon = GeoPolygon.from_geojson(geojson(box(105.78, 20.98, 105.87, 21.07)))
    chosen = devices_in(polygon, devices)
    assert chosen == [device.id for device in devices if device.id[0] in "ab"]
    assert len(chosen) == 10
    # Input order is kept, whatever it is.
    assert devices_in(polygon, reversed(devices)) == list(reversed(chosen))


def test_devices_without_coordinates_are_never_inside():
    polygon = GeoPolygon.from_geojson(geojson(box(-180, -90, 180, 90)))
    devices = [
        DevicePoint("placed", 21.0, 105.8),
        DevicePoint("unplaced", None, None),
        DevicePoint("no-lon", 21.0, None),
        ("nan", math.nan, 105.8),
        ("inf", 21.0, math.inf),
    ]
    assert devices_in(polygon, devices) == ["placed"]
    assert devices_in(polygon, []) == []
    assert devices_in(GeoCircle(lat=21.0, lon=105.8, radius_m=10), devices) == ["placed"]


def test_boundary_counts_as_inside():
    square = GeoPolygon.from_geojson(geojson(box(0, 0, 1, 1)))
    assert square.contains(lat=0.0, lon=0.5)  # on an edge
    assert square.contains(lat=0.0, lon=0.0)  # on a corner
    assert square.contains(lat=1.0, lon=1.0)
    assert square.contains(lat=0.5, lon=0.5)
    assert not square.contains(lat=-1e-9, lon=0.5)
    assert not square.contains(lat=0.5, lon=1.000001)
    on_edge = [("edge", 0.0, 0.5), ("corner", 1.0, 0.0), ("out", 1.5, 0.5)]
    assert devices_in(square, on_edge) == ["edge", "corner"]


def test_holes_are_outside_but_their_rims_are_inside():
    ring_with_hole = GeoPolygon.from_geojson(geojson(box(0, 0, 10, 10), box(4, 4, 6, 6)))
    assert ring_with_hole.contains(lat=2, lon=2)
    assert not ring_with_hole.contains(lat=5, lon=5)
    assert not ring_with_hole.contains(lat=4.5, lon=4.5)
    assert ring_with_hole.contains(lat=5, lon=4)  # on the hole's rim
    assert len(ring_with_hole.holes) == 1
    devices = [("hole", 5, 5), ("solid", 8, 8), ("rim", 6, 5)]
    assert devices_in(ring_with_hole, devices) == ["solid", "rim"]


def test_ten_thousand_devices_match_a_brute_force_check():
    rng = random.Random(20261124)
    devices = [
        DevicePoint(f"d{i}", rng.uniform(20.9, 21.2), rng.uniform(105.7, 106.0)) for i in range(10_000)
    ]
    rectangle = GeoPolygon.from_geojson(geojson(box(105.8, 21.0, 105.9, 21.1)))
    expected = [
        device.id
        for device in devices
        if device.lat is not None
        and device.lon is not None
        and 21.0 <= device.lat <= 21.1
        and 105.8 <= device.lon <= 105.9
    ]
    assert 500 < len(expected) < 2000
    assert devices_in(rectangle, devices) == expected

    circle = GeoCircle(lat=21.05, lon=105.85, radius_m=5000)
    expected_in_circle = [
        device.id
        for device in devices
        if device.lat is not None
        and device.lon is not None
        and circle.contains(lat=device.lat, lon=device.lon)
    ]
    assert expected_in_circle
    assert devices_in(circle, devices) == expected_in_circle


# --- Distances and circles ------------------------------------------------------------------------


@pytest.mark.parametrize("lat", [0.0, 10.5, 22.0, -45.0])
@pytest.mark.parametrize("degrees", [0.001, 0.01, 0.1, 0.9])
def test_haversine_metres_within_half_a_percent_of_the_ellipsoid(lat, degrees):
    north = haversine_m(lat, 105.0, lat + degrees, 105.0)
    east = haversine_m(lat, 105.0, lat, 105.0 + degrees)
    assert north == pytest.approx(metres_north(lat, degrees), rel=0.005)
    assert east == pytest.approx(metres_east(lat, degrees), rel=0.005)


def test_haversine_basics():
    assert haversine_m(21.0, 105.8, 21.0, 105.8) == 0.0
    assert haversine_m(21.0, 105.8, 21.1, 105.9) == pytest.approx(haversine_m(21.1, 105.9, 21.0, 105.8))
    # Antipodes: half a great circle, without a math domain error from rounding.
    assert haversine_m(0.0, 0.0, 0.0, 180.0, earth_radius_m=1.0) == pytest.approx(math.pi)


@pytest.mark.parametrize(("lat", "lon"), [(0.0, 0.0), (22.0, 105.8)])
@pytest.mark.parametrize("radius_m", [300.0, 1000.0, 25_000.0])
def test_circle_radius_is_metres_on_the_ground(lat, lon, radius_m):
    circle = GeoCircle.from_dict({"lat": lat, "lon": lon, "radius_m": radius_m})

    def north_of_centre(metres: float) -> tuple[float, float]:
        return lat + math.degrees(metres / meridian_radius_m(lat)), lon

    def east_of_centre(metres: float) -> tuple[float, float]:
        return lat, lon + math.degrees(metres / (prime_vertical_radius_m(lat) * math.cos(math.radians(lat))))

    for towards in (north_of_centre, east_of_centre):
        inside_lat, inside_lon = towards(radius_m * 0.995)
        outside_lat, outside_lon = towards(radius_m * 1.005)
        assert circle.contains(lat=inside_lat, lon=inside_lon)
        assert not circle.contains(lat=outside_lat, lon=outside_lon)
        devices = [("in", inside_lat, inside_lon), ("out", outside_lat, outside_lon), ("centre", lat, lon)]
        assert devices_in(circle, devices) == ["in", "centre"]


@pytest.mark.parametrize(
    ("value", "field", "hint"),
    [
        ({"lat": 21.0, "lon": 105.8, "radius_m": 0}, "targets.circle.radius_m", "greater than 0"),
        ({"lat": 21.0, "lon": 105.8, "radius_m": -5}, "targets.circle.radius_m", "greater than 0"),
        ({"lat": 21.0, "lon": 105.8, "radius_m": 100_001}, "targets.circle.radius_m", "larger"),
        ({"lat": 21.0, "lon": 105.8, "radius_m": math.inf}, "targets.circle.radius_m", "finite"),
        ({"lat": 91.0, "lon": 105.8, "radius_m": 500}, "targets.circle.lat", "latitude"),
        ({"lat": 21.0, "lon": -180.5, "radius_m": 500}, "targets.circle.lon", "longitude"),
        ({"lat": math.nan, "lon": 105.8, "radius_m": 500}, "targets.circle.lat", "finite"),
        ({"lat": "21.0", "lon": 105.8, "radius_m": 500}, "targets.circle.lat", "number"),
        ({"lat": True, "lon": 105.8, "radius_m": 500}, "targets.circle.lat", "number"),
        ({"lat": 21.0, "lon": 105.8}, "targets.circle.radius_m", "required"),
        ({"lat": 21.0, "lon": 105.8, "radius_km": 5}, "targets.circle.radius_km", "unknown"),
        ([21.0, 105.8, 500], "targets.circle", "object"),
    ],
)
def test_bad_circles_are_named(value, field, hint):
    with pytest.raises(GeoError) as raised:
        GeoCircle.from_dict(value)
    assert raised.value.field == field
    assert hint in raised.value.detail


def test_circle_limit_can_be_chosen():
    wide = {"lat": 21.0, "lon": 105.8, "radius_m": 150_000}
    assert GeoCircle.from_dict(wide, max_radius_m=200_000).radius_m == 150_000
    with pytest.raises(GeoError):
        GeoCircle.from_dict(wide)
    assert MAX_CIRCLE_RADIUS_M == 100_000


# --- CAP order versus GeoJSON order ---------------------------------------------------------------

CAP_RING = ((21.03, 105.79), (21.04, 105.79), (21.04, 105.80), (21.03, 105.80), (21.03, 105.79))


def test_cap_polygon_is_read_as_lat_lon():
    polygon = GeoPolygon.from_cap(CAP_RING)
    assert polygon.exterior[0] == LonLat(lon=105.79, lat=21.03)
    assert polygon.contains(lat=21.035, lon=105.795)
    assert not polygon.contains(lat=105.795, lon=21.035)
    as_geojson = polygon.to_geojson()
    assert as_geojson["coordinates"] == [[[lon, lat] for lat, lon in CAP_RING]]
    assert GeoPolygon.from_geojson(as_geojson) == polygon


def test_cap_order_given_as_geojson_is_caught():
    swapped = {"type": "Polygon", "coordinates": [[list(pair) for pair in CAP_RING]]}
    with pytest.raises(GeoError) as raised:
        GeoPolygon.from_geojson(swapped)
    assert raised.value.field == "targets.polygon.coordinates[0][0]"
    assert "latitude 105.79" in raised.value.detail


def test_geojson_order_given_as_cap_is_caught():
    swapped = tuple((lon, lat) for lat, lon in CAP_RING)
    with pytest.raises(GeoError) as raised:
        GeoPolygon.from_cap(swapped, field="alert/info[0]/area[0]/polygon[0]")
    assert raised.value.field == "alert/info[0]/area[0]/polygon[0][0]"


def test_cap_polygon_problems_name_the_polygon():
    bow_tie = ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0))
    with pytest.raises(GeoError, match="Self-intersection") as raised:
        GeoPolygon.from_cap(bow_tie, field="polygon[2]")
    assert raised.value.field == "polygon[2]"
    with pytest.raises(GeoError, match="at least 4"):
        GeoPolygon.from_cap(CAP_RING[:3])
    with pytest.raises(GeoError, match="not closed"):
        GeoPolygon.from_cap(CAP_RING[:4])


def test_cap_circle_radius_is_kilometres():
    circle = GeoCircle.from_cap(CapCircle((21.035, 105.795), 0.5))
    assert (circle.lat, circle.lon, circle.radius_m) == (21.035, 105.795, 500.0)
    assert circle.contains(lat=21.035, lon=105.795)
    with pytest.raises(GeoError, match="greater than 0") as raised:
        GeoCircle.from_cap(CapCircle((21.0, 105.8), 0.0), field="alert/info[0]/area[0]/circle[1]")
    assert raised.value.field == "alert/info[0]/area[0]/circle[1]"
    with pytest.raises(GeoError, match="larger"):
        GeoCircle.from_cap(CapCircle((21.0, 105.8), 150.0))


# --- Invalid polygons -----------------------------------------------------------------------------

BOW_TIE = [(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)]


@pytest.mark.parametrize(
    ("value", "field", "hint"),
    [
        (geojson(BOW_TIE), "targets.polygon.coordinates[0]", "Self-intersection"),
        (geojson(box(0, 0, 10, 10), BOW_TIE), "targets.polygon.coordinates[1]", "Self-intersection"),
        (geojson(box(0, 0, 1, 1), box(5, 5, 6, 6)), "targets.polygon.coordinates", "invalid polygon"),
        (geojson(box(0, 0, 2, 2), box(1, 1, 3, 3)), "targets.polygon.coordinates", "invalid polygon"),
        (geojson([(0, 0), (1, 0), (2, 0), (0, 0)]), "targets.polygon.coordinates[0]", "invalid ring"),
        (geojson([(0, 0), (0, 0), (0, 0), (0, 0)]), "targets.polygon.coordinates[0]", "invalid ring"),
        (geojson([(0, 0), (1, 0), (1, 1), (0, 0)][:3]), "targets.polygon.coordinates[0]", "at least 4"),
        (geojson([(0, 0), (1, 0), (1, 1), (0, 1)]), "targets.polygon.coordinates[0]", "not closed"),
        (geojson([(0, 0), (1, 0), (1, 95), (0, 0)]), "targets.polygon.coordinates[0][2]", "latitude"),
        (geojson([(0, 0), (1, 0), (181, 1), (0, 0)]), "targets.polygon.coordinates[0][2]", "longitude"),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], ["1", 1], [0, 0]]]},
            "targets.polygon.coordinates[0][2]",
            "number",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [True, 1], [0, 0]]]},
            "targets.polygon.coordinates[0][2]",
            "number",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, math.nan], [0, 0]]]},
            "targets.polygon.coordinates[0][2]",
            "finite",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 1], [0, 0]]]},
            "targets.polygon.coordinates[0][1]",
            "position",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0, 0, 0], [1, 1], [0, 0]]]},
            "targets.polygon.coordinates[0][1]",
            "position",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0, "x"], [1, 1], [0, 0]]]},
            "targets.polygon.coordinates[0][1]",
            "altitude",
        ),
        ({"type": "Polygon", "coordinates": ["0,0 1,0 1,1 0,0"]}, "targets.polygon.coordinates[0]", "list"),
        ({"type": "Polygon", "coordinates": []}, "targets.polygon.coordinates", "non-empty"),
        ({"type": "Polygon"}, "targets.polygon.coordinates", "non-empty"),
        ({"type": "MultiPolygon", "coordinates": [[box(0, 0, 1, 1)]]}, "targets.polygon.type", "Polygon"),
        ({"coordinates": [box(0, 0, 1, 1)]}, "targets.polygon.type", "Polygon"),
        ("POLYGON ((0 0, 1 0, 1 1, 0 0))", "targets.polygon", "GeoJSON"),
    ],
)
def test_invalid_polygons_are_named(value, field, hint):
    with pytest.raises(GeoError) as raised:
        GeoPolygon.from_geojson(value)
    assert raised.value.field == field
    assert hint in raised.value.detail


def test_positions_may_carry_an_altitude_and_rings_any_winding():
    clockwise = list(reversed(box(0, 0, 1, 1)))
    polygon = GeoPolygon.from_geojson(
        {
            "type": "Polygon",
            "coordinates": [[[lon, lat, 12.5] for lon, lat in clockwise]],
            "bbox": [0, 0, 1, 1],
        }
    )
    assert polygon.contains(lat=0.5, lon=0.5)


def test_field_prefix_can_be_chosen():
    with pytest.raises(GeoError) as raised:
        GeoPolygon.from_geojson(geojson(BOW_TIE), field="zones[3].polygon")
    assert raised.value.field == "zones[3].polygon.coordinates[0]"


# --- Property: convex polygons against half-planes ------------------------------------------------


@st.composite
def convex_polygons(draw: st.DrawFn) -> tuple[float, float, float, list[float]]:
    """A convex polygon as vertices on a circle, in increasing angle (counter-clockwise)."""
    center_lon = draw(st.floats(min_value=102.0, max_value=110.0))
    center_lat = draw(st.floats(min_value=8.0, max_value=23.5))
    radius = draw(st.floats(min_value=0.001, max_value=0.5))
    gaps = draw(st.lists(st.floats(min_value=0.1, max_value=1.0), min_size=3, max_size=10))
    start = draw(st.floats(min_value=0.0, max_value=2 * math.pi))
    total = sum(gaps)
    angles, angle = [], start
    for gap in gaps:
        angles.append(angle)
        angle += gap / total * 2 * math.pi
    return center_lon, center_lat, radius, angles


@given(
    convex_polygons(),
    st.floats(min_value=-1.3, max_value=1.3),
    st.floats(min_value=-1.3, max_value=1.3),
)
def test_point_in_convex_polygon_iff_inside_every_half_plane(polygon_spec, x, y):
    center_lon, center_lat, radius, angles = polygon_spec
    vertices = [(center_lon + radius * math.cos(a), center_lat + radius * math.sin(a)) for a in angles]
    polygon = GeoPolygon.from_geojson(geojson([*vertices, vertices[0]]))
    point_lon, point_lat = center_lon + x * radius, center_lat + y * radius

    inside_every_half_plane = True
    for (x1, y1), (x2, y2) in zip(vertices, [*vertices[1:], vertices[0]], strict=True):
        cross = (x2 - x1) * (point_lat - y1) - (y2 - y1) * (point_lon - x1)
        distance_to_edge_line = abs(cross) / math.hypot(x2 - x1, y2 - y1)
        # Too close to call in floating point; exact boundary cases are tested above.
        assume(distance_to_edge_line > 1e-9 * radius)
        inside_every_half_plane &= cross > 0

    assert polygon.contains(lat=point_lat, lon=point_lon) == inside_every_half_plane
    expected = ["p"] if inside_every_half_plane else []
    assert devices_in(polygon, [("p", point_lat, point_lon)]) == expected
