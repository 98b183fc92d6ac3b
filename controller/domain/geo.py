"""Geographic alert targets: polygons and circles, and which devices lie inside them.

Pure: no I/O. Input problems raise `GeoError(field, detail)` where `field` is a path such as
`targets.polygon.coordinates[0][2]` or `targets.circle.radius_m`, so that the API can name it.

Coordinate order is the classic trap: GeoJSON writes positions as [lon, lat], CAP writes "lat,lon".
Shapes are therefore built only through constructors named after their source
(`GeoPolygon.from_geojson` / `GeoPolygon.from_cap`, `GeoCircle.from_dict` / `GeoCircle.from_cap`),
points are stored as `LonLat(lon=…, lat=…)` named tuples, and containment is asked with keyword-only
`lat=` / `lon=` arguments.

Geometry model:
- Polygons are tested in plain longitude/latitude, edges being straight lines in that plane (as RFC 7946
  §3.1.1 has it). At ward scale that is what a map shows; antimeridian-crossing shapes are not
  supported (Vietnam is nowhere near it). A point on the boundary, or on a hole's boundary, is inside.
  Ring winding order is not enforced (RFC 7946 asks parsers not to reject on it).
- Circles use the great-circle (haversine) distance on a sphere whose radius is the WGS 84 ellipsoid's
  Gaussian radius of curvature √(M·N) at the circle's centre. A single global radius (6371 km) is 0.56%
  off north–south at the equator; the local one stays within 0.34% of the ellipsoid in every
  direction at every latitude (0.29% at Vietnam's 22°N), far below a loudspeaker's reach.

`devices_in` asks the shape once for all devices: a prepared shapely polygon queried with the
vectorised `intersects_xy`, or a numpy haversine for circles. For one shape against many points that
beats an STRtree over the points, which would have to be rebuilt for every call as devices move.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import shapely

from controller.domain.cap import CapCircle, LatLon
from controller.domain.errors import FieldError

LATITUDE_LIMIT: Final[float] = 90.0
LONGITUDE_LIMIT: Final[float] = 180.0
WGS84_SEMI_MAJOR_AXIS_M: Final[float] = 6_378_137.0
WGS84_FLATTENING: Final[float] = 1 / 298.257223563
_WGS84_E2: Final[float] = WGS84_FLATTENING * (2 - WGS84_FLATTENING)
# A loudspeaker reaches a few hundred metres; a circle wider than a province is a unit mistake (km
# given as m) far more often than a real target.
MAX_CIRCLE_RADIUS_M: Final[float] = 100_000.0
MIN_RING_POSITIONS: Final[int] = 4
# Hand-drawn ward polygons have tens of points; this bounds the work a hostile request can cause.
MAX_POLYGON_POSITIONS: Final[int] = 100_000
_POSITION_WITHOUT_ALTITUDE: Final[int] = 2
_POSITION_WITH_ALTITUDE: Final[int] = 3
_CIRCLE_KEYS: Final[tuple[str, ...]] = ("lat", "lon", "radius_m")
_METRES_PER_KM: Final[float] = 1000.0


class GeoError(FieldError):
    """An invalid geographic target. `field` names the offending input, e.g. `targets.circle.lat`."""


class LonLat(NamedTuple):
    """A WGS 84 position in GeoJSON order."""

    lon: float
    lat: float


class DevicePoint(NamedTuple):
    """A device as `devices_in` sees it; devices without a known position have lat/lon None."""

    id: str
    lat: float | None
    lon: float | None


BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class GeoPolygon:
    """A validated polygon: closed rings of `LonLat`, the exterior first, then any holes.

    Build it with `from_geojson` or `from_cap`, which validate and name the offending input; the
    initialiser trusts its arguments.
    """

    exterior: tuple[LonLat, ...]
    holes: tuple[tuple[LonLat, ...], ...] = ()
    _geometry: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        geometry = shapely.Polygon(self.exterior, self.holes)
        # Preparing builds the edge index once, so that each point test is logarithmic in the edges.
        shapely.prepare(geometry)
        object.__setattr__(self, "_geometry", geometry)

    @classmethod
    def from_geojson(cls, value: object, field: str = "targets.polygon") -> GeoPolygon:
        """From a GeoJSON Polygon object `{"type": "Polygon", "coordinates": [[[lon, lat], …], …]}`."""
        if not isinstance(value, Mapping):
            raise GeoError(field, 'must be a GeoJSON object {"type": "Polygon", "coordinates": [...]}')
        kind = value.get("type")
        if kind != "Polygon":
            raise GeoError(f"{field}.type", f"must be 'Polygon' (got {kind!r})")
        coordinates = value.get("coordinates")
        coordinates_field = f"{field}.coordinates"
        # JSON arrays arrive as lists; tuples are accepted for callers building shapes in code.
        if not isinstance(coordinates, list | tuple) or not coordinates:
            raise GeoError(
                coordinates_field, "must be a non-empty list of rings: the boundary, then any holes"
            )
        rings: list[list[LonLat]] = []
        total = 0
        for ring_index, ring in enumerate(coordinates):
            ring_field = f"{coordinates_field}[{ring_index}]"
            if not isinstance(ring, list | tuple):
                raise GeoError(ring_field, "must be a list of [lon, lat] positions")
            total += len(ring)
            if total > MAX_POLYGON_POSITIONS:
                raise GeoError(coordinates_field, f"more than {MAX_POLYGON_POSITIONS} positions")
            _check_ring_length(len(ring), ring_field)
            rings.append(
                [_geojson_position(position, f"{ring_field}[{index}]") for index, position in enumerate(ring)]
            )
        return _validated_polygon(rings, coordinates_field, lambda index: f"{coordinates_field}[{index}]")

    @classmethod
    def from_cap(cls, points: Sequence[LatLon], field: str = "polygon") -> GeoPolygon:
        """From a CAP `<polygon>`: a closed ring of (lat, lon) pairs, as `cap.CapArea.polygons` holds."""
        if len(points) > MAX_POLYGON_POSITIONS:
            raise GeoError(field, f"more than {MAX_POLYGON_POSITIONS} positions")
        _check_ring_length(len(points), field)
        ring = [
            _checked_position(lat=lat, lon=lon, field=f"{field}[{index}]")
            for index, (lat, lon) in enumerate(points)
        ]
        return _validated_polygon([ring], field, lambda _: field)

    def contains(self, *, lat: float, lon: float) -> bool:
        """Whether the point is inside or on the boundary."""
        return bool(shapely.intersects_xy(self._geometry, lon, lat))

    def contains_many(self, lats: FloatArray, lons: FloatArray) -> BoolArray:
        """`contains` for arrays of points at once."""
        return np.asarray(shapely.intersects_xy(self._geometry, lons, lats), dtype=np.bool_)

    def to_geojson(self) -> dict[str, object]:
        rings = (self.exterior, *self.holes)
        return {"type": "Polygon", "coordinates": [[[lon, lat] for lon, lat in ring] for ring in rings]}


@dataclass(frozen=True, slots=True)
class GeoCircle:
    """A validated circle: centre in WGS 84 degrees, radius in metres along the Earth's surface.

    Build it with `from_dict` or `from_cap`, which validate and name the offending input.
    """

    lat: float
    lon: float
    radius_m: float

    @classmethod
    def from_dict(
        cls, value: object, field: str = "targets.circle", *, max_radius_m: float = MAX_CIRCLE_RADIUS_M
    ) -> GeoCircle:
        """From `{"lat": …, "lon": …, "radius_m": …}`."""
        if not isinstance(value, Mapping):
            raise GeoError(field, "must be an object {lat, lon, radius_m}")
        for key in value:
            if key not in _CIRCLE_KEYS:
                raise GeoError(f"{field}.{key}", "unknown field; a circle has lat, lon and radius_m")
        numbers: dict[str, float] = {}
        for key in _CIRCLE_KEYS:
            if key not in value:
                raise GeoError(f"{field}.{key}", "required")
            numbers[key] = _finite_number(value[key], f"{field}.{key}", key)
        position = _checked_position(lat=numbers["lat"], lon=numbers["lon"], field=field, name_part=True)
        radius_m = _checked_radius(numbers["radius_m"], f"{field}.radius_m", max_radius_m)
        return cls(lat=position.lat, lon=position.lon, radius_m=radius_m)

    @classmethod
    def from_cap(
        cls, circle: CapCircle, field: str = "circle", *, max_radius_m: float = MAX_CIRCLE_RADIUS_M
    ) -> GeoCircle:
        """From a CAP `<circle>` (centre (lat, lon), radius in km), as `cap.CapArea.circles` holds."""
        lat, lon = circle.center
        position = _checked_position(lat=lat, lon=lon, field=field)
        radius_m = _checked_radius(circle.radius_km * _METRES_PER_KM, field, max_radius_m)
        return cls(lat=position.lat, lon=position.lon, radius_m=radius_m)

    def contains(self, *, lat: float, lon: float) -> bool:
        """Whether the point is within `radius_m` (great-circle distance), the rim included."""
        distance = haversine_m(self.lat, self.lon, lat, lon, earth_radius_m=local_earth_radius_m(self.lat))
        return distance <= self.radius_m

    def contains_many(self, lats: FloatArray, lons: FloatArray) -> BoolArray:
        """`contains` for arrays of points at once."""
        lat1 = math.radians(self.lat)
        lat2 = np.radians(lats)
        half_dlat = (lat2 - lat1) / 2
        half_dlon = np.radians(lons - self.lon) / 2
        chord = np.sin(half_dlat) ** 2 + math.cos(lat1) * np.cos(lat2) * np.sin(half_dlon) ** 2
        distance = 2 * local_earth_radius_m(self.lat) * np.arcsin(np.sqrt(np.minimum(chord, 1.0)))
        return np.asarray(distance <= self.radius_m, dtype=np.bool_)


GeoShape = GeoPolygon | GeoCircle


def local_earth_radius_m(lat: float) -> float:
    """The WGS 84 Gaussian radius of curvature √(M·N) at `lat` (degrees): the sphere that best fits the
    ellipsoid around that latitude, in every direction at once."""
    return (
        WGS84_SEMI_MAJOR_AXIS_M
        * math.sqrt(1 - _WGS84_E2)
        / (1 - _WGS84_E2 * math.sin(math.radians(lat)) ** 2)
    )


def haversine_m(
    lat1: float, lon1: float, lat2: float, lon2: float, *, earth_radius_m: float | None = None
) -> float:
    """Great-circle distance in metres between two (lat, lon) points in degrees.

    The sphere's radius defaults to `local_earth_radius_m` at the points' mean latitude.
    """
    radius = local_earth_radius_m((lat1 + lat2) / 2) if earth_radius_m is None else earth_radius_m
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dlat = (phi2 - phi1) / 2
    half_dlon = math.radians(lon2 - lon1) / 2
    chord = math.sin(half_dlat) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlon) ** 2
    # min(): rounding can push `chord` a hair above 1 for antipodal points, outside asin's domain.
    return 2 * radius * math.asin(math.sqrt(min(chord, 1.0)))


def devices_in(shape: GeoShape, devices: Iterable[tuple[str, float | None, float | None]]) -> list[str]:
    """Ids of the devices, given as (id, lat, lon), that lie inside `shape`, in input order.

    A device without coordinates (None, NaN or infinite) is never inside.
    """
    ids: list[str] = []
    lats: list[float] = []
    lons: list[float] = []
    for device_id, lat, lon in devices:
        if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
            continue
        ids.append(device_id)
        lats.append(lat)
        lons.append(lon)
    if not ids:
        return []
    inside = shape.contains_many(np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64))
    return [ids[index] for index in np.flatnonzero(inside)]


# --- Validation -----------------------------------------------------------------------------------


def _finite_number(value: object, field: str, name: str) -> float:
    # bool is an int subclass: `true` in JSON must not become 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GeoError(field, f"{name} must be a finite number (got {value!r})")
    return float(value)


def _checked_position(*, lat: float, lon: float, field: str, name_part: bool = False) -> LonLat:
    """Range-check one position; with `name_part`, errors name `field.lat` / `field.lon`."""
    lat_field = f"{field}.lat" if name_part else field
    lon_field = f"{field}.lon" if name_part else field
    if not math.isfinite(lat) or not -LATITUDE_LIMIT <= lat <= LATITUDE_LIMIT:
        raise GeoError(lat_field, f"latitude {lat!r} is outside [-90, 90]")
    if not math.isfinite(lon) or not -LONGITUDE_LIMIT <= lon <= LONGITUDE_LIMIT:
        raise GeoError(lon_field, f"longitude {lon!r} is outside [-180, 180]")
    return LonLat(lon=float(lon), lat=float(lat))


def _geojson_position(value: object, field: str) -> LonLat:
    if not isinstance(value, list | tuple) or len(value) not in {
        _POSITION_WITHOUT_ALTITUDE,
        _POSITION_WITH_ALTITUDE,
    }:
        raise GeoError(field, "must be a position [lon, lat] (optionally with an altitude third)")
    lon = _finite_number(value[0], field, "longitude")
    lat = _finite_number(value[1], field, "latitude")
    if len(value) == _POSITION_WITH_ALTITUDE:
        _finite_number(value[2], field, "altitude")
    return _checked_position(lat=lat, lon=lon, field=field)


def _check_ring_length(length: int, field: str) -> None:
    if length < MIN_RING_POSITIONS:
        raise GeoError(
            field,
            f"a ring needs at least {MIN_RING_POSITIONS} positions, "
            f"the last equal to the first (got {length})",
        )


def _checked_radius(radius_m: float, field: str, max_radius_m: float) -> float:
    if not math.isfinite(radius_m) or radius_m <= 0:
        raise GeoError(field, f"radius must be greater than 0 m (got {radius_m:g} m)")
    if radius_m > max_radius_m:
        raise GeoError(field, f"radius {radius_m:g} m is larger than the {max_radius_m:g} m allowed")
    return radius_m


def _validated_polygon(
    rings: Sequence[Sequence[LonLat]], whole_field: str, ring_field: Callable[[int], str]
) -> GeoPolygon:
    """Closure, then each ring on its own (so a bow-tie names its ring), then the rings together."""
    for index, ring in enumerate(rings):
        if ring[0] != ring[-1]:
            raise GeoError(
                ring_field(index),
                f"ring is not closed: the first position {list(ring[0])} "
                f"differs from the last {list(ring[-1])}",
            )
    for index, ring in enumerate(rings):
        reason = _invalidity(shapely.Polygon(ring))
        if reason is not None:
            raise GeoError(ring_field(index), f"invalid ring: {reason}")
    # Holes outside the boundary, crossing it or each other, or splitting the polygon.
    reason = _invalidity(shapely.Polygon(rings[0], rings[1:]))
    if reason is not None:
        raise GeoError(whole_field, f"invalid polygon: {reason}")
    return GeoPolygon(exterior=tuple(rings[0]), holes=tuple(tuple(ring) for ring in rings[1:]))


def _invalidity(geometry: Any) -> str | None:
    """Why a shapely polygon is unusable as a target (GEOS's explanation), or None when it is fine."""
    if not shapely.is_valid(geometry):
        return str(shapely.is_valid_reason(geometry))
    if not float(shapely.area(geometry)) > 0:
        return "the ring encloses no area"
    return None
