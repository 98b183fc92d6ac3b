"""The CoAP driver (docs/protocol.md §5, DESIGN.md §3): sensors that publish readings by Observe (RFC 7641)
and take configuration and commands as confirmable requests (RFC 7252).

One aiocoap client context (UDP only) serves every configured sensor. On open, a supervisor task per
sensor finds its reading resources (from the configuration, or from `/.well-known/core`, RFC 6690)
and keeps one Observe registration per reading alive: a registration that fails, ends, or stays
silent past its Max-Age plus a grace period is registered again, with jittered exponential backoff
after failures. Notifications become `TelemetryReading`s; payloads that do not decode, or values
outside the configured physical range, become `MalformedPayload`s instead, never readings.

`send` turns a command document into one confirmable PUT (configuration) or POST (command). aiocoap
retransmits it per RFC 7252 §4.2 with the driver's `CoapTiming`; the driver itself does no retries
(the dispatcher decides). aiocoap stays inside this module: its exceptions and error responses are
translated here into the `DriverError` family, chained from the original.

Health, per sensor address (docs/protocol.md §5.10): online/offline follows reachability (answers versus
timeouts and ICMP errors); `degraded(address)` is true from any failure until the sensor answers well
again, and a failure tied to one resource (5.xx, a malformed or out-of-range reading) lasts until that
resource serves well, so a good rain reading does not hide a broken water level. Each change of either
is a `DeviceState` event. The first failure is logged as a warning, the repeats at debug level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self
from urllib.parse import urljoin, urlsplit

# aiocoap ships without a py.typed marker (chrysn/aiocoap has partial inline hints only), so mypy sees
# Any; everything that crosses this module's boundary is converted to typed values below.
import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.constants import TransportTuning
from aiocoap.util import linkformat
from aiocoap.util.vendored.link_header import ParseException

from drivers.base import (
    Ack,
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    DeviceUnreachable,
    Driver,
    DriverError,
    InboundEvent,
    MalformedPayload,
    ProtocolError,
    TelemetryReading,
)

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 5683
WELL_KNOWN_CORE: Final = "/.well-known/core"
READING_RESOURCE_TYPE: Final = "wardcast.reading"
DEFAULT_CONFIG_PATH: Final = "/config"
DEFAULT_COMMAND_PATH: Final = "/command"
# CoAP Content-Formats (IANA registry, RFC 7252 §12.3).
CONTENT_FORMAT_TEXT: Final = 0
CONTENT_FORMAT_LINK_FORMAT: Final = 40
CONTENT_FORMAT_JSON: Final = 50
# RFC 7252 §5.10.5: a response without Max-Age is fresh for 60 s.
DEFAULT_MAX_AGE_S: Final = 60
WIRE_VERSION: Final = 1
_SUCCESS_CLASS: Final = 2
_CLIENT_ERROR_CLASS: Final = 4
_SERVER_ERROR_CLASS: Final = 5
# Diagnostic payloads (RFC 7252 §5.5.2) are meant for people; a long one is cut in error messages.
_MAX_DIAGNOSTIC_CHARS: Final = 200

Method = Literal["GET", "PUT", "POST", "DELETE"]
PayloadFormat = Literal["json", "text"]

_METHOD_CODES: Final[Mapping[str, Any]] = {
    "GET": aiocoap.GET,
    "PUT": aiocoap.PUT,
    "POST": aiocoap.POST,
    "DELETE": aiocoap.DELETE,
}


def utc_now() -> datetime:
    return datetime.now(UTC)


# Errors


class CoapErrorResponse(ProtocolError):  # noqa: N818  # RFC 7252 calls it an error response
    """The sensor answered a request with a 4.xx or 5.xx response code."""

    def __init__(self, address: str, method: str, path: str, code: str, name: str, diagnostic: str) -> None:
        self.address = address
        self.method = method
        self.path = path
        self.code = code
        """The dotted response code, e.g. `4.00`."""
        self.name = name
        """RFC 7252's name for it, e.g. `Bad Request`."""
        self.diagnostic = diagnostic
        """The diagnostic payload (RFC 7252 §5.5.2), empty when there was none."""
        detail = f": {diagnostic}" if diagnostic else ""
        super().__init__(f"{address}: {method} {path} answered {code} {name}{detail}")


class CoapClientError(CoapErrorResponse):
    """4.xx: the sensor refused the request as it was sent."""


class CoapServerError(CoapErrorResponse):
    """5.xx: the sensor could not carry out a valid request."""


# Configuration


@dataclass(frozen=True, slots=True)
class CoapTiming:
    """Message-layer timing (RFC 7252 §4.8) and the driver's own re-registration pacing.

    A confirmable request is sent again after a random timeout between `ack_timeout_s` and
    `ack_timeout_s × ack_random_factor`, doubling each time, `max_retransmit` times; after
    MAX_TRANSMIT_WAIT the exchange has failed (`DeviceTimeout`).
    """

    ack_timeout_s: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    reregister_initial_s: float = 1.0
    """The first wait before registering an Observe again after a failure; doubles up to the max."""
    reregister_max_s: float = 60.0
    notification_grace_s: float = 5.0
    """How long past a notification's Max-Age the driver waits for the next before it registers again
    (RFC 7641 §3.3.1: the representation is stale, the registration may have been lost)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ack_timeout_s) and self.ack_timeout_s > 0):
            raise ValueError(f"ack_timeout_s {self.ack_timeout_s} must be a positive number")
        if not (math.isfinite(self.ack_random_factor) and self.ack_random_factor >= 1):
            raise ValueError(f"ack_random_factor {self.ack_random_factor} must be at least 1 (RFC 7252 §4.8)")
        if self.max_retransmit < 0:
            raise ValueError(f"max_retransmit {self.max_retransmit} must not be negative")
        if not 0 < self.reregister_initial_s <= self.reregister_max_s:
            raise ValueError("reregister_initial_s must be positive and at most reregister_max_s")
        if self.notification_grace_s < 0:
            raise ValueError("notification_grace_s must not be negative")

    @property
    def max_transmit_wait_s(self) -> float:
        """RFC 7252 §4.8.2 MAX_TRANSMIT_WAIT: from the first transmission until the sender gives up
        (93 s with the defaults)."""
        return self.ack_timeout_s * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor

    @property
    def exchange_timeout_s(self) -> float:
        """The longest the driver waits for an answer: MAX_TRANSMIT_WAIT plus PROCESSING_DELAY
        (= ACK_TIMEOUT), which also bounds a separate response after an empty ACK (aiocoap has no
        request timeout of its own)."""
        return self.max_transmit_wait_s + self.ack_timeout_s

    def transport_tuning(self) -> Any:
        """These parameters as aiocoap's `TransportTuning`, which each message carries."""
        tuning = TransportTuning()
        # Instance attributes shadow the class defaults; the derived values (MAX_TRANSMIT_WAIT, ...)
        # are properties computed from them.
        tuning.ACK_TIMEOUT = self.ack_timeout_s
        tuning.ACK_RANDOM_FACTOR = self.ack_random_factor
        tuning.MAX_RETRANSMIT = self.max_retransmit
        tuning.reliability = True  # requests go confirmable
        return tuning


@dataclass(frozen=True, slots=True)
class MetricLimits:
    """What a plausible reading of one metric looks like; anything else is a `MalformedPayload`."""

    unit: str | None = None
    """The unit readings must carry (also the unit of a `text` reading, which carries none)."""
    minimum: float = -math.inf
    maximum: float = math.inf

    def __post_init__(self) -> None:
        if math.isnan(self.minimum) or math.isnan(self.maximum) or self.minimum > self.maximum:
            raise ValueError(f"physical range {self.minimum}..{self.maximum} is empty")


@dataclass(frozen=True, slots=True)
class ReadingResource:
    """One observable reading resource of a sensor."""

    path: str
    payload_format: PayloadFormat = "json"
    """`json`: the profile's reading document (docs/protocol.md §5.3); `text`: a bare decimal number in
    text/plain, for third-party sensors."""
    metric: str | None = None
    """Defaults to the last path segment (`/sensors/water_level` → `water_level`)."""

    def __post_init__(self) -> None:
        _check_path(self.path)

    @property
    def metric_name(self) -> str:
        return self.metric if self.metric is not None else self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class CoapSensor:
    """One sensor: where it is, what it offers, and what its readings may be."""

    address: str
    """`coap://host[:port]`; the port defaults to 5683."""
    readings: tuple[ReadingResource, ...] = ()
    """The reading resources to observe; empty: discover them (resources with rt="wardcast.reading")."""
    limits: Mapping[str, MetricLimits] = field(default_factory=dict)
    """Physical range and unit per metric name."""
    config_path: str = DEFAULT_CONFIG_PATH
    command_path: str = DEFAULT_COMMAND_PATH

    def __post_init__(self) -> None:
        parse_address(self.address)
        _check_path(self.config_path)
        _check_path(self.command_path)


def parse_address(address: str) -> tuple[str, int]:
    """`(host, port)` of a `coap://host[:port]` sensor address; `ValueError` for anything else."""
    parts = urlsplit(address)
    if parts.scheme != "coap" or not parts.hostname:
        raise ValueError(f"sensor address {address!r}: expected coap://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"sensor address {address!r}: expected no path, query, fragment or user")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"sensor address {address!r}: {error}") from None
    return parts.hostname, port if port is not None else DEFAULT_PORT


def _check_path(path: str) -> None:
    if not path.startswith("/") or "?" in path or "#" in path:
        raise ValueError(f"resource path {path!r}: expected an absolute path such as /sensors/water_level")


def _uri(address: str, path: str) -> str:
    return address.rstrip("/") + path


# Discovery (RFC 6690 link format), pure


@dataclass(frozen=True, slots=True)
class DiscoveredResource:
    """One link of a `/.well-known/core` document."""

    path: str
    resource_types: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    content_formats: tuple[int, ...] = ()
    observable: bool = False
    title: str | None = None


def parse_link_format(document: str) -> tuple[DiscoveredResource, ...]:
    """The resources of a link-format document (RFC 6690), with aiocoap's parser.

    `rt`, `if` and `ct` may hold several space-separated values. Links to other hosts are left out;
    relative references are resolved against `/.well-known/core`. Raises `ValueError` when the
    document is not link format.
    """
    try:
        parsed = linkformat.parse(document)
    except ParseException as error:
        raise ValueError(f"not link format: {error.args[-1] if error.args else error}") from None
    resources: list[DiscoveredResource] = []
    for link in parsed.links:
        target = urlsplit(urljoin("coap://sensor" + WELL_KNOWN_CORE, str(link.href)))
        if target.netloc != "sensor":
            continue  # describes a resource elsewhere (RFC 6690 §2.1 anchors, absolute links)
        attributes: dict[str, list[str | None]] = {}
        for name, value in link.attr_pairs:
            attributes.setdefault(str(name).lower(), []).append(None if value is None else str(value))
        try:
            content_formats = tuple(int(value) for value in _words(attributes.get("ct")))
        except ValueError:
            raise ValueError(f"link <{link.href}>: ct must be numeric content-formats") from None
        titles = [value for value in attributes.get("title", []) if value is not None]
        resources.append(
            DiscoveredResource(
                path=target.path or "/",
                resource_types=_words(attributes.get("rt")),
                interfaces=_words(attributes.get("if")),
                content_formats=content_formats,
                observable="obs" in attributes,
                title=titles[0] if titles else None,
            )
        )
    return tuple(resources)


def _words(values: Sequence[str | None] | None) -> tuple[str, ...]:
    return tuple(word for value in values or () if value is not None for word in value.split())


def reading_resources(discovered: Sequence[DiscoveredResource]) -> tuple[ReadingResource, ...]:
    """The profile's reading resources among discovered ones (rt="wardcast.reading")."""
    return tuple(
        ReadingResource(resource.path)
        for resource in discovered
        if READING_RESOURCE_TYPE in resource.resource_types
    )


# Payloads, pure


class PayloadError(ValueError):
    """A reading payload that does not decode (the reason says why)."""


class OutOfRangeError(PayloadError):
    """A reading that decodes but lies outside its metric's physical range, or carries a wrong unit."""


def decode_reading(
    address: str,
    resource: ReadingResource,
    payload: bytes,
    content_format: int | None,
    *,
    limits: MetricLimits | None,
    received_at: datetime,
) -> TelemetryReading:
    """A notification's payload as a reading (docs/protocol.md §5.3); `PayloadError` or `OutOfRangeError`."""
    metric = resource.metric_name
    unit = limits.unit if limits is not None else None
    at = received_at
    if resource.payload_format == "text":
        if content_format not in (None, CONTENT_FORMAT_TEXT):
            raise PayloadError(
                f"content-format {content_format}, expected {CONTENT_FORMAT_TEXT} (text/plain)"
            )
        value = _decimal(_text(payload).strip())
    else:
        if content_format not in (None, CONTENT_FORMAT_JSON):
            raise PayloadError(f"content-format {content_format}, expected {CONTENT_FORMAT_JSON} (JSON)")
        document = _json_object(payload)
        value = _number(document.get("value"), "value")
        if "unit" in document:
            sent_unit = document["unit"]
            if not isinstance(sent_unit, str):
                raise PayloadError("unit is not a string")
            if unit is not None and sent_unit != unit:
                raise OutOfRangeError(f"unit {sent_unit!r} where {unit!r} is expected")
            unit = sent_unit
        if "at" in document:
            at = _timestamp(document["at"])
    if limits is not None and not limits.minimum <= value <= limits.maximum:
        raise OutOfRangeError(
            f"{metric} {value:g} outside its physical range {limits.minimum:g}..{limits.maximum:g}"
        )
    return TelemetryReading(address=address, metric=metric, value=value, unit=unit, at=at)


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8") from None


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        document = json.loads(_text(payload))
    except json.JSONDecodeError as error:
        raise PayloadError(f"payload is not JSON ({error.msg})") from None
    if not isinstance(document, dict):
        raise PayloadError("payload is not a JSON object")
    version = document.get("v", WIRE_VERSION)
    if version != WIRE_VERSION or isinstance(version, bool):
        raise PayloadError(f"wire version {version!r}, expected {WIRE_VERSION}")
    return document


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{name} is missing or not a number")
    return _finite(float(value), name)


def _decimal(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise PayloadError(f"payload {text[:40]!r} is not a decimal number") from None
    return _finite(number, "payload")


def _finite(number: float, name: str) -> float:
    if not math.isfinite(number):
        raise PayloadError(f"{name} is not finite")
    return number


def _timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise PayloadError("at is not a string")
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"at {value[:40]!r} is not an ISO-8601 time") from None
    if instant.tzinfo is None:
        raise PayloadError(f"at {value!r} has no UTC offset")
    return instant.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class CoapRequest:
    """What one command document puts on the wire."""

    method: Method
    path: str
    payload: bytes
    content_format: int | None = CONTENT_FORMAT_JSON


def encode_command(document: Mapping[str, Any], sensor: CoapSensor | None = None) -> CoapRequest:
    """The request for a command document (docs/protocol.md §5.6); `ValueError` naming the member.

    `{"op": "configure", "config": {...}}` becomes a PUT of the config to the sensor's config
    resource; `{"op": "command", "action": "identify", ...}` a POST of every member but `op` and
    `path` to its command resource. An optional `path` sends either elsewhere.
    """
    op = document.get("op")
    path = document.get("path")
    if path is not None:
        if not isinstance(path, str):
            raise ValueError("path: expected a string")
        _check_path(path)
    if op == "configure":
        config = document.get("config")
        if not isinstance(config, Mapping) or not config:
            raise ValueError("config: expected a non-empty object")
        body = {"v": WIRE_VERSION, **config}
        default_path = sensor.config_path if sensor is not None else DEFAULT_CONFIG_PATH
        return CoapRequest("PUT", path or default_path, _encode_json(body, "config"))
    if op == "command":
        action = document.get("action")
        if not isinstance(action, str) or not action:
            raise ValueError("action: expected a non-empty string")
        body = {
            "v": WIRE_VERSION,
            **{key: value for key, value in document.items() if key not in ("op", "path")},
        }
        default_path = sensor.command_path if sensor is not None else DEFAULT_COMMAND_PATH
        return CoapRequest("POST", path or default_path, _encode_json(body, "command"))
    raise ValueError(f"op: expected 'configure' or 'command', got {op!r}")


def _encode_json(body: Mapping[str, Any], name: str) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: not JSON-encodable ({error})") from None


# Responses


@dataclass(frozen=True, slots=True)
class CoapResponse:
    """A response or notification, as typed values."""

    code: str
    """Dotted, e.g. `2.05`."""
    name: str
    payload: bytes
    content_format: int | None
    max_age_s: int
    observe: int | None
    received_at: datetime

    @property
    def successful(self) -> bool:
        return self.code.startswith(f"{_SUCCESS_CLASS}.")

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def _response(message: Any, received_at: datetime) -> CoapResponse:
    code = message.code
    content_format = message.opt.content_format
    max_age = message.opt.max_age
    observe = message.opt.observe
    return CoapResponse(
        code=str(code.dotted),
        name=str(code.name_printable),
        payload=bytes(message.payload),
        content_format=None if content_format is None else int(content_format),
        max_age_s=DEFAULT_MAX_AGE_S if max_age is None else int(max_age),
        observe=None if observe is None else int(observe),
        received_at=received_at,
    )


def _raise_for_code(address: str, method: str, path: str, response: CoapResponse, wrapped: Any) -> None:
    if response.successful:
        return
    diagnostic = response.text()[:_MAX_DIAGNOSTIC_CHARS] if response.payload else ""
    error_class = int(response.code.split(".", 1)[0])
    kind: type[CoapErrorResponse]
    if error_class == _CLIENT_ERROR_CLASS:
        kind = CoapClientError
    elif error_class == _SERVER_ERROR_CLASS:
        kind = CoapServerError
    else:
        raise ProtocolError(f"{address}: {method} {path} answered {response.code}, not a response code")
    # Chained from aiocoap's own wrapper of an unsuccessful response, as every driver error is.
    raise kind(
        address, method, path, response.code, response.name, diagnostic
    ) from coap_error.ResponseWrappingError(wrapped)


def _translate(error: BaseException, address: str, method: str, path: str, timeout: float) -> DriverError:
    where = f"{address}: {method} {path}"
    if isinstance(error, TimeoutError):  # our own deadline
        return DeviceTimeout(f"{where}: no answer within {timeout:g} s")
    if isinstance(error, coap_error.TimeoutError):  # ConRetransmitsExceeded: MAX_TRANSMIT_WAIT passed
        return DeviceTimeout(f"{where}: no acknowledgement after every retransmission ({error})")
    if isinstance(error, coap_error.LibraryShutdown):
        return DeviceUnreachable(f"{where}: the driver is closing")
    if isinstance(error, coap_error.MessageError):
        return ProtocolError(f"{where}: the sensor reset the exchange (RST)")
    if isinstance(error, coap_error.NetworkError | OSError):  # ICMP unreachable, no route, resolution
        cause = error.__cause__ if error.__cause__ is not None else error
        return DeviceUnreachable(f"{where}: unreachable ({cause})")
    return ProtocolError(f"{where}: {type(error).__name__}: {error}")


# Observation


class CoapObservation:
    """One Observe registration (RFC 7641): an async context manager that registers on entry and an
    async iterator of the responses: the registration's answer first, then each notification.

    Entry raises like `CoapDriver.request`; iteration raises `CoapErrorResponse` for a 4.xx/5.xx
    notification (which ends an observation) and `DeviceTimeout`/`DeviceUnreachable` when the
    exchange fails, and stops when the sensor ends the observation or the resource is not observable.
    Leaving the block forgets the registration; the sensor drops it at its next notification, which
    aiocoap answers with a reset (RFC 7641 §3.6).
    """

    def __init__(self, driver: CoapDriver, address: str, path: str, *, timeout: float) -> None:
        parse_address(address)
        _check_path(path)
        self.address = address
        self.path = path
        self._driver = driver
        self._timeout = timeout
        self._request: Any = None
        self._notifications: Any = None
        self._first: CoapResponse | None = None
        self.observing = False
        """True once the sensor accepted the registration (its answer carried an Observe option)."""

    async def __aenter__(self) -> Self:
        request = self._driver._start("GET", self.address, self.path, observe=True)  # noqa: SLF001 - a part of the driver
        self._request = request
        # Iterate from the start, so that no notification slips by between the answer and the loop.
        self._notifications = request.observation.__aiter__()
        try:
            self._first = await self._driver._answer(request, "GET", self.address, self.path, self._timeout)  # noqa: SLF001
        except BaseException:
            self._forget()
            raise
        self.observing = self._first.observe is not None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._forget()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> CoapResponse:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if not self.observing or self._notifications is None:
            raise StopAsyncIteration
        try:
            message = await self._notifications.__anext__()
        except StopAsyncIteration:
            self.observing = False
            raise
        except (coap_error.Error, OSError) as error:
            self.observing = False
            raise _translate(error, self.address, "GET", self.path, self._timeout) from error
        response = _response(message, self._driver.clock())
        if not response.successful:
            self.observing = False  # an error notification always ends the observation (RFC 7641 §4.2)
        _raise_for_code(self.address, "GET", self.path, response, message)
        return response

    def _forget(self) -> None:
        request, self._request = self._request, None
        if request is None or request.observation is None:
            return
        observation = request.observation
        if request.response.done():
            _retire(observation)
        else:
            # aiocoap reports a failed registration to the observation as well; cancelling it before
            # that would make aiocoap raise inside its own request task.
            request.response.add_done_callback(lambda _: _retire(observation))


def _retire(observation: Any) -> None:
    if not observation.cancelled:
        observation.cancel()


def _settled(response: Any) -> None:
    """Marks an abandoned response's outcome as seen, so that asyncio does not report it as lost."""
    if not response.cancelled():
        response.exception()


# Health


@dataclass(frozen=True, slots=True)
class SensorHealth:
    """A snapshot of what the driver knows about one sensor address."""

    address: str
    online: bool | None
    """None until the sensor first answered or failed."""
    degraded: bool
    consecutive_failures: int
    readings: int
    malformed_payloads: int
    out_of_range: int
    error_responses: int
    timeouts: int
    unreachable: int
    registrations: int
    """Observe registrations the sensor accepted (the first one and every re-registration)."""


@dataclass(slots=True)
class _Health:
    online: bool | None = None
    link_failing: bool = False
    """The last exchange got no usable answer; cleared by any answer."""
    faulty: dict[str, str] = field(default_factory=dict)
    """Resource path → what went wrong there; each cleared when that resource next serves well."""
    reason: str | None = None
    consecutive_failures: int = 0
    readings: int = 0
    malformed_payloads: int = 0
    out_of_range: int = 0
    error_responses: int = 0
    timeouts: int = 0
    unreachable: int = 0
    registrations: int = 0

    @property
    def degraded(self) -> bool:
        return self.link_failing or bool(self.faulty)

    @property
    def state(self) -> tuple[bool | None, bool]:
        return self.online, self.degraded


class _Backoff:
    """Jittered exponential delays, so that sensors lost together do not all come back at once."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self._next_s = initial_s

    def reset(self) -> None:
        self._next_s = self._initial_s

    def take(self) -> float:
        delay = self._next_s * random.uniform(0.8, 1.2)
        self._next_s = min(self._next_s * 2, self._maximum_s)
        return min(delay, self._maximum_s)


# The driver


class CoapDriver:
    """Implements `Driver` for CoAP sensors; see the module docstring."""

    def __init__(
        self,
        sensors: Sequence[CoapSensor] = (),
        *,
        timing: CoapTiming | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        addresses = [sensor.address for sensor in sensors]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"sensor addresses repeat: {addresses}")
        self.sensors: dict[str, CoapSensor] = {sensor.address: sensor for sensor in sensors}
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self.timing = timing if timing is not None else CoapTiming()
        self.clock = clock
        self._tuning = self.timing.transport_tuning()
        self._context: Any = None
        self._health: dict[str, _Health] = {}
        self._events: asyncio.Queue[InboundEvent | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        # UDP only: aiocoap's default list would also open TCP/TLS/WebSocket clients nobody uses here.
        self._context = await aiocoap.Context.create_client_context(
            transports=["udp6"], loggername="coap.driver"
        )
        for sensor in self.sensors.values():
            self._start_supervising(sensor)
        return self

    def _start_supervising(self, sensor: CoapSensor) -> None:
        task = asyncio.get_running_loop().create_task(
            self._supervise(sensor), name=f"coap-sensor {sensor.address}"
        )
        self._tasks.add(task)
        self._supervisors[sensor.address] = task
        task.add_done_callback(self._tasks.discard)

    async def add_sensor(self, sensor: CoapSensor) -> None:
        """Start observing `sensor` (replacing an earlier configuration of the same address)."""
        await self.remove_sensor(sensor.address)
        self.sensors[sensor.address] = sensor
        if self._context is not None:
            self._start_supervising(sensor)

    async def remove_sensor(self, address: str) -> None:
        """Stop observing the sensor at `address` (its observations are cancelled)."""
        self.sensors.pop(address, None)
        task = self._supervisors.pop(address, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()
        self._events.put_nowait(None)

    # -- Driver ------------------------------------------------------------------------------------

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        """One confirmable PUT (`op: configure`) or POST (`op: command`); an `Ack` on a 2.xx answer."""
        if command.expires_at.tzinfo is None:
            raise ProtocolError(f"command {command.command_id}: expires_at must be timezone-aware")
        if command.area is not None:
            raise ProtocolError(f"command {command.command_id}: CoAP sensors take no area commands")
        try:
            parse_address(command.address)
            request = encode_command(command.document, self.sensors.get(command.address))
        except ValueError as error:
            raise ProtocolError(f"command {command.command_id}: {error}") from error
        published_at = self.clock()
        # A sensor has no notion of expiry, so the driver is the last place that can refuse a stale command.
        if command.expires_at <= published_at:
            raise ProtocolError(f"command {command.command_id} expired at {command.expires_at.isoformat()}")
        await self.request(
            command.address,
            request.method,
            request.path,
            payload=request.payload,
            content_format=request.content_format,
            timeout=timeout,
        )
        return Ack(command_id=command.command_id, accepted_at=self.clock(), published_at=published_at)

    async def events(self) -> AsyncIterator[InboundEvent]:
        """Readings, sensor states and `MalformedPayload`s until the driver closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield event

    async def ping(self) -> bool:
        """True while the driver's CoAP endpoint is open; per sensor, see `degraded` and `health`."""
        return self._context is not None

    # -- CoAP, for callers that need more than the Driver protocol -----------------------------------

    async def request(
        self,
        address: str,
        method: Method,
        path: str,
        *,
        payload: bytes = b"",
        content_format: int | None = None,
        accept: int | None = None,
        timeout: float | None = None,
    ) -> CoapResponse:
        """One confirmable request; the 2.xx response, or `CoapClientError` / `CoapServerError`,
        `DeviceTimeout` (after `timeout` or MAX_TRANSMIT_WAIT, whichever comes first) or
        `DeviceUnreachable`.

        A 4.xx answer leaves the sensor's health alone (it refused what the caller sent); a 5.xx, a
        timeout or an unreachable sensor marks it degraded.
        """
        parse_address(address)
        _check_path(path)
        deadline = self._deadline(timeout)
        message = self._start(
            method, address, path, payload=payload, content_format=content_format, accept=accept
        )
        try:
            response = await self._answer(message, method, address, path, deadline)
        except CoapClientError:
            self._answered(address, path)  # a well-formed refusal of what the caller sent
            raise
        except CoapServerError as error:
            self._misbehaved(address, path, error, counter="error_responses")
            raise
        except DriverError as error:
            self._failed(address, error)
            raise
        self._answered(address, path)
        return response

    async def discover(self, address: str, *, timeout: float | None = None) -> tuple[DiscoveredResource, ...]:
        """The resources a sensor lists at `/.well-known/core` (RFC 6690)."""
        response = await self.request(address, "GET", WELL_KNOWN_CORE, timeout=timeout)
        if response.content_format not in (None, CONTENT_FORMAT_LINK_FORMAT):
            raise ProtocolError(
                f"{address}: {WELL_KNOWN_CORE} came as content-format {response.content_format}, "
                f"expected {CONTENT_FORMAT_LINK_FORMAT} (link format)"
            )
        try:
            return parse_link_format(_text(response.payload))
        except ValueError as error:
            raise ProtocolError(f"{address}: {WELL_KNOWN_CORE}: {error}") from error

    def observe(self, address: str, path: str, *, timeout: float | None = None) -> CoapObservation:
        """A raw Observe registration of any resource (for resources outside the profile);
        `async with driver.observe(address, "/time") as notifications: async for ...`."""
        return CoapObservation(self, address, path, timeout=self._deadline(timeout))

    # -- health --------------------------------------------------------------------------------------

    def degraded(self, address: str) -> bool:
        """True from a failure of the sensor until it next answers well."""
        health = self._health.get(address)
        return health is not None and health.degraded

    @property
    def degraded_sensors(self) -> frozenset[str]:
        return frozenset(address for address, health in self._health.items() if health.degraded)

    def health(self, address: str) -> SensorHealth:
        health = self._health.get(address, _Health())
        return SensorHealth(
            address=address,
            online=health.online,
            degraded=health.degraded,
            consecutive_failures=health.consecutive_failures,
            readings=health.readings,
            malformed_payloads=health.malformed_payloads,
            out_of_range=health.out_of_range,
            error_responses=health.error_responses,
            timeouts=health.timeouts,
            unreachable=health.unreachable,
            registrations=health.registrations,
        )

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after a change of some sensor's health; TimeoutError after
        `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    # -- the edge ------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout {timeout} must be positive")
        limit = self.timing.exchange_timeout_s
        return limit if timeout is None else min(timeout, limit)

    def _start(
        self,
        method: str,
        address: str,
        path: str,
        *,
        payload: bytes = b"",
        content_format: int | None = None,
        accept: int | None = None,
        observe: bool = False,
    ) -> Any:
        """Puts a request on its way through aiocoap; returns aiocoap's request handle."""
        context = self._context
        if context is None:
            raise DeviceUnreachable(f"{address}: the driver is not open")
        options: dict[str, Any] = {}
        if content_format is not None:
            options["content_format"] = content_format
        if accept is not None:
            options["accept"] = accept
        if observe:
            options["observe"] = 0
        message = aiocoap.Message(
            code=_METHOD_CODES[method],
            uri=_uri(address, path),
            payload=payload,
            transport_tuning=self._tuning,
            **options,
        )
        request = context.request(message)
        request.response.add_done_callback(_settled)
        return request

    async def _answer(
        self, request: Any, method: str, address: str, path: str, timeout: float
    ) -> CoapResponse:
        """The response to a started request, translated; raises for 4.xx/5.xx."""
        try:
            async with asyncio.timeout(timeout):
                # Shielded: cancelling aiocoap's own response future races its block-wise request
                # task, which may then complete the cancelled future (InvalidStateError). A request
                # given up on runs out its retransmissions inside aiocoap and is dropped.
                message = await asyncio.shield(request.response)
        except (TimeoutError, coap_error.Error, OSError) as error:
            raise _translate(error, address, method, path, timeout) from error
        response = _response(message, self.clock())
        _raise_for_code(address, method, path, response, message)
        return response

    # -- observing the sensors -----------------------------------------------------------------------

    async def _supervise(self, sensor: CoapSensor) -> None:
        readings = sensor.readings
        backoff = _Backoff(self.timing.reregister_initial_s, self.timing.reregister_max_s)
        while not readings:
            try:
                readings = reading_resources(await self.discover(sensor.address))
            except DriverError:
                await asyncio.sleep(backoff.take())  # pacing the next attempt; health already noted
                continue
            if not readings:
                log.warning(
                    "coap %s lists no reading resources (rt=%s) at %s; nothing to observe",
                    sensor.address,
                    READING_RESOURCE_TYPE,
                    WELL_KNOWN_CORE,
                )
                return
        async with asyncio.TaskGroup() as group:
            for reading in readings:
                group.create_task(self._observe_forever(sensor, reading), name=f"coap-observe {reading.path}")

    async def _observe_forever(self, sensor: CoapSensor, reading: ReadingResource) -> None:
        backoff = _Backoff(self.timing.reregister_initial_s, self.timing.reregister_max_s)
        while True:
            try:
                pause_s = await self._observe_once(sensor, reading, backoff)
            except DriverError as error:
                log.debug("coap %s%s: observation failed: %s", sensor.address, reading.path, error)
                pause_s = backoff.take()
            except Exception:  # a bug here must not end the sensor's observations for good
                log.exception("coap %s%s: unexpected error while observing", sensor.address, reading.path)
                pause_s = backoff.take()
            if pause_s > 0:
                await asyncio.sleep(pause_s)  # pacing re-registration, not synchronisation

    async def _observe_once(self, sensor: CoapSensor, reading: ReadingResource, backoff: _Backoff) -> float:
        """One registration, for as long as it lasts; returns how long to wait before the next."""
        address = sensor.address
        try:
            async with self.observe(address, reading.path) as observation:
                first = await anext(observation)
                self._registered(address, observation.observing)
                backoff.reset()
                self._take(sensor, reading, first)
                if not observation.observing:
                    # Not observable: poll instead, as often as the representation stays fresh.
                    return float(min(max(first.max_age_s, 1), self.timing.reregister_max_s))
                fresh_for = first.max_age_s
                while True:
                    try:
                        async with asyncio.timeout(fresh_for + self.timing.notification_grace_s):
                            notification = await anext(observation)
                    except StopAsyncIteration:
                        log.info("coap %s%s: the sensor ended the observation", address, reading.path)
                        return backoff.take()
                    except TimeoutError:
                        # RFC 7641 §3.3.1: past Max-Age the reading is stale and the registration may
                        # be lost (a restarted sensor forgets its observers): register again at once.
                        log.info(
                            "coap %s%s: no notification within Max-Age; registering again",
                            address,
                            reading.path,
                        )
                        return 0.0
                    fresh_for = notification.max_age_s
                    self._take(sensor, reading, notification)
        except CoapErrorResponse as error:
            # The sensor answered, but its own reading resource failed: that is the sensor's fault.
            self._misbehaved(address, reading.path, error, counter="error_responses")
            return backoff.take()
        except DriverError as error:
            self._failed(address, error)
            return backoff.take()

    def _take(self, sensor: CoapSensor, reading: ReadingResource, response: CoapResponse) -> None:
        address = sensor.address
        try:
            telemetry = decode_reading(
                address,
                reading,
                response.payload,
                response.content_format,
                limits=sensor.limits.get(reading.metric_name),
                received_at=response.received_at,
            )
        except PayloadError as error:
            counter = "out_of_range" if isinstance(error, OutOfRangeError) else "malformed_payloads"
            self._misbehaved(address, reading.path, error, counter=counter)
            self._emit(
                MalformedPayload(address=address, topic=_uri(address, reading.path), reason=str(error))
            )
            return
        self._health_of(address).readings += 1
        self._answered(address, reading.path)
        self._emit(telemetry)

    # -- health bookkeeping ----------------------------------------------------------------------------

    def _health_of(self, address: str) -> _Health:
        return self._health.setdefault(address, _Health())

    def _registered(self, address: str, observing: bool) -> None:
        if observing:
            self._health_of(address).registrations += 1
        self._answered(address)

    def _answered(self, address: str, path: str | None = None) -> None:
        """A well-formed answer: the link works, and the resource at `path` (if given) serves well."""
        health = self._health_of(address)
        before = health.state
        health.online, health.link_failing = True, False
        if path is not None:
            health.faulty.pop(path, None)
        self._settle(address, health, before)

    def _failed(self, address: str, error: DriverError) -> None:
        """No usable exchange: the sensor is offline (no answer, unreachable) or reset it; degraded."""
        health = self._health_of(address)
        before = health.state
        if isinstance(error, DeviceTimeout):
            health.timeouts += 1
        elif isinstance(error, DeviceUnreachable):
            health.unreachable += 1
        if isinstance(error, DeviceTimeout | DeviceUnreachable):
            health.online = False
        health.link_failing = True
        self._note_failure(address, health, before, error)

    def _misbehaved(self, address: str, path: str, error: Exception, *, counter: str) -> None:
        """The sensor answered, but the resource at `path` failed (5.xx, a malformed or implausible
        reading): degraded until that resource next serves well."""
        health = self._health_of(address)
        before = health.state
        setattr(health, counter, getattr(health, counter) + 1)
        health.online = True
        health.faulty[path] = str(error)
        self._note_failure(address, health, before, error)

    def _note_failure(
        self, address: str, health: _Health, before: tuple[bool | None, bool], error: Exception
    ) -> None:
        health.consecutive_failures += 1
        health.reason = str(error)
        if before[1]:
            log.debug("coap %s still failing (%d): %s", address, health.consecutive_failures, error)
        else:
            log.warning("coap %s failed, marked degraded: %s", address, error)
        self._settle(address, health, before)

    def _settle(self, address: str, health: _Health, before: tuple[bool | None, bool]) -> None:
        if before[1] and not health.degraded:
            log.info("coap %s answers again after %d failures", address, health.consecutive_failures)
            health.consecutive_failures, health.reason = 0, None
        if health.state != before:
            attributes: dict[str, Any] = {"degraded": health.degraded}
            if health.reason is not None:
                attributes["reason"] = health.reason
            self._emit(
                DeviceState(
                    address=address, online=health.online is True, at=self.clock(), attributes=attributes
                )
            )
        self._changed.set()

    def _emit(self, event: InboundEvent) -> None:
        self._events.put_nowait(event)
        self._changed.set()


if TYPE_CHECKING:

    def _implements(driver: CoapDriver) -> Driver:
        return driver
