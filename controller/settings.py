"""Configuration: `config.yaml`, overridden by `WARDCAST_<SECTION>__<KEY>` environment variables.

Everything is validated before anything starts; an error names the key (e.g. `mqtt.url`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from datetime import time
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV_VAR = "WARDCAST_CONFIG"
# Values that people copy from examples; a secret equal to one of these is refused.
_PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "password", "admin", "wardcast", "test"}
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/wardcast.db"
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme not in {"sqlite", "postgresql", "postgresql+psycopg"}:
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        if scheme == "postgresql":
            return "postgresql+psycopg" + value[len("postgresql") :]
        return value


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    public_url: str | None = Field(
        default=None, description="base URL devices use to fetch media; defaults to http://host:port"
    )

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"


class ManagedBrokerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 18830
    state_dir: Path = Path("var/mosquitto")


def _broker_username(value: str) -> str:
    # A device's username is its address ([a-z0-9][a-z0-9_-]*); a dot keeps service accounts apart.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError("use 1-64 letters, digits, '.', '-' or '_'")
    return value


class SimulatorAccountSettings(_Section):
    """SIMULATION ONLY, unfit for production: one broker account with rights on every device's topics,
    for simulated fleets that do not connect each device with its own credentials."""

    enabled: bool = False
    username: str = "wardcast.simulator"
    # Managed mode generates one (var/mosquitto/credentials.json); external mode needs it when enabled.
    password: SecretStr | None = None

    _check_username = field_validator("username")(_broker_username)


class ClaimAccountSettings(_Section):
    """The one broker account unprovisioned devices share to ask to be claimed (docs/protocol.md §1.13):
    write to claim requests, read claim answers, nothing else. Its password is set at the factory."""

    enabled: bool = True
    username: str = "wardcast.claim"
    password: SecretStr | None = None

    _check_username = field_validator("username")(_broker_username)


class ExternalAccessSettings(_Section):
    """`mqtt.mode: external`: where the controller writes the broker's password and ACL files it
    generates from the database, and the command that makes the broker reload them without a restart
    (e.g. `["systemctl", "reload", "mosquitto"]`). None: device accounts stay the broker admin's job."""

    password_file: Path | None = None
    acl_file: Path | None = None
    reload_command: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _all_or_nothing(self) -> Self:
        given = [self.password_file is not None, self.acl_file is not None, bool(self.reload_command)]
        if any(given) and not all(given):
            raise ValueError("password_file, acl_file and reload_command go together: set all three or none")
        return self


class MqttSettings(_Section):
    mode: Literal["managed", "external"] = "managed"
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = "wardcast-controller"
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    managed: ManagedBrokerSettings = ManagedBrokerSettings()
    simulator: SimulatorAccountSettings = SimulatorAccountSettings()
    claim: ClaimAccountSettings = ClaimAccountSettings()
    external_access: ExternalAccessSettings = ExternalAccessSettings()

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
            raise ValueError("must look like mqtt://host:port")
        return value

    @model_validator(mode="after")
    def _external_needs_url_and_credentials(self) -> Self:
        if self.mode == "external":
            if self.url is None:
                raise ValueError("mqtt.url is required when mqtt.mode is external")
            if not self.username or self.password is None:
                raise ValueError("mqtt.username and mqtt.password are required when mqtt.mode is external")
        if self.password is not None and self.password.get_secret_value().lower() in _PLACEHOLDER_SECRETS:
            raise ValueError("mqtt.password is a placeholder; set a real secret")
        for name, account in (("simulator", self.simulator), ("claim", self.claim)):
            secret = account.password.get_secret_value() if account.password is not None else None
            if secret is not None and secret.lower() in _PLACEHOLDER_SECRETS:
                raise ValueError(f"mqtt.{name}.password is a placeholder; set a real secret")
            writes_files = self.mode == "external" and self.external_access.password_file is not None
            if writes_files and account.enabled and secret is None:
                raise ValueError(
                    f"mqtt.{name}.password is required when the controller writes an external broker's "
                    "files (mqtt.external_access) and the account is enabled"
                )
        names = [self.username or "controller", self.simulator.username, self.claim.username]
        if len(set(names)) != len(names):
            raise ValueError("mqtt.username, mqtt.simulator.username and mqtt.claim.username must differ")
        if self.mode == "managed" and (self.external_access.password_file is not None):
            raise ValueError("mqtt.external_access is for mqtt.mode external (managed writes its own)")
        return self


class MediaSettings(_Section):
    dir: Path = Path("var/media")
    max_bytes: Annotated[int, Field(gt=0)] = 50 * 1024 * 1024


class DispatchSettings(_Section):
    default_expiry_s: Annotated[int, Field(gt=0)] = 3600
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Slack on top of the media's own duration before a silent device is taken as failed.
    completion_grace_s: Annotated[float, Field(ge=0)] = 30.0
    # One publish per area topic where the speakers follow it (docs/protocol.md §1.12); off: one per device.
    area_fanout: bool = True


class GraceSettings(_Section):
    """How late a missed occurrence may still play, per priority class (seconds)."""

    normal: Annotated[int, Field(ge=0)] = 900
    priority: Annotated[int, Field(ge=0)] = 1800
    emergency: Annotated[int, Field(ge=0)] = 3600


class SchedulesSettings(_Section):
    conflict_horizon_days: Annotated[int, Field(ge=1, le=366)] = 60
    max_window_days: Annotated[int, Field(ge=1, le=3660)] = 366
    # After a restart, occurrences this far back that never fired are recorded as missed.
    catch_up_days: Annotated[int, Field(ge=0, le=60)] = 7
    grace_s: GraceSettings = GraceSettings()
    # The programme each speaker keeps, retained, for when its link drops (docs/protocol.md §1.10).
    device_programme_hours: Annotated[int, Field(ge=1, le=168)] = 48
    # Rebuilt this often at the latest (so the window moves on), and shortly after every change.
    device_programme_refresh_s: Annotated[int, Field(ge=10, le=86_400)] = 900
    device_programme_debounce_s: Annotated[float, Field(ge=0.05, le=60)] = 1.0


class TtsSettings(_Section):
    """Text-to-speech for `content.tts`: espeak-ng with one of its Vietnamese voices."""

    voice: str = Field(
        default="vi",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_+-]*$",
        description="espeak-ng voice: vi (Northern), vi-vn-x-central, vi-vn-x-south",
    )
    speed_wpm: Annotated[int, Field(ge=80, le=450)] = 150
    pitch: Annotated[int, Field(ge=0, le=99)] = 50
    binary: str = Field(default="espeak-ng", min_length=1, description="command name or absolute path")
    max_chars: Annotated[int, Field(ge=1, le=100_000)] = 5000


class AlertTemplateTargets(_Section):
    areas: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()


class AlertTemplate(_Section):
    """A message the city approved in advance: an IOC key may send it live city-wide without a second
    person (the two-person rule of issue 4)."""

    headline: str = Field(min_length=1, max_length=200)
    text: str = Field(default="", max_length=5000)
    targets: AlertTemplateTargets


class AlertSettings(_Section):
    """Alerts from the IOC and operators (issue 4): limits, drill wording, CAP geocodes, webhooks."""

    # Per API key, over a sliding minute: every call of an `ioc` key, and every alert call of any key.
    rate_limit_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 60
    default_expiry_s: Annotated[int, Field(ge=60, le=7 * 86_400)] = 3600
    max_repeats: Annotated[int, Field(ge=1, le=100)] = 10
    # Spoken after the drill prefix tone and before the text of every drill.
    drill_announcement: str = Field(default="Đây là tin diễn tập.", min_length=1, max_length=200)
    # CAP <geocode> valueNames whose value is one of our area codes (ward, residential group).
    geocode_value_names: tuple[str, ...] = ("WARDCAST_AREA", "VN_WARD_CODE", "VN_GROUP_CODE")
    webhook_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    webhook_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    # Signs webhook bodies (HMAC-SHA256); none means callbacks are refused.
    webhook_secret: SecretStr | None = None
    # A live alert reaching this share of all speakers and screens (or naming a root area) is city-wide:
    # made by a person, it waits for a second person's approval.
    city_wide_share: Annotated[float, Field(gt=0, le=1)] = 0.8
    templates: dict[str, AlertTemplate] = Field(default_factory=dict)


class TelemetrySettings(_Section):
    """Sensor readings from every transport (issue 5): batched writes, retention and downsampling."""

    # A batch is written when it holds this many readings, or this long after its first one.
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    # Readings waiting to be written beyond this are dropped (and counted): memory stays bounded when
    # the database cannot keep up.
    max_pending: Annotated[int, Field(ge=1000, le=10_000_000)] = 500_000
    # Raw readings are kept this long, then folded into buckets of `rollup_step_s` (count, sum, min,
    # max), which are kept for `rollup_retention_days`.
    raw_retention_hours: Annotated[int, Field(ge=1, le=24 * 3660)] = 7 * 24
    rollup_step_s: Annotated[int, Field(ge=10, le=86_400)] = 300
    rollup_retention_days: Annotated[int, Field(ge=1, le=36_600)] = 2 * 366
    maintenance_interval_s: Annotated[int, Field(ge=1, le=86_400)] = 600
    # The most points one telemetry request may return (raw readings or buckets).
    max_points: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    # Processes that take MQTT telemetry off the controller's event loop (a shared subscription splits
    # the sensors between them); 0 keeps it in the controller's process.
    ingest_workers: Annotated[int, Field(ge=0, le=32)] = 1

    @model_validator(mode="after")
    def _buckets_fit_in_the_raw_window(self) -> Self:
        if self.rollup_step_s > self.raw_retention_hours * 3600:
            raise ValueError("rollup_step_s must not be longer than raw_retention_hours")
        return self


class ProvisioningSettings(_Section):
    """Device provisioning (docs/protocol.md §1.13): bundles and the zero-touch claim."""

    # How long a technician has to approve a device's claim request.
    claim_window_s: Annotated[int, Field(ge=30, le=7 * 86_400)] = 600
    # A claim request's `at` may differ this much from the controller's clock (devices without RTC
    # battery boot with a rough clock until NTP answers).
    claim_clock_skew_s: Annotated[int, Field(ge=5, le=86_400)] = 300
    # Where devices reach the broker, as written into their bundles (default: the broker's own address).
    broker_host: str | None = Field(default=None, min_length=1, max_length=253)
    broker_port: Annotated[int, Field(ge=1, le=65535)] | None = None


class KindAvailabilitySettings(_Section):
    """How one kind of device shows it is alive (issue 6, docs/protocol.md §1.5)."""

    # How often the device republishes its state; sent to devices in a `configure` operation.
    heartbeat_s: Annotated[float, Field(gt=0, le=3600)] = 60
    # Nothing heard for this long: offline. At least two heartbeats, so that one lost message never
    # flips a device, and well above the broker's own detection of a dead connection (1.5 × keep-alive).
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 150
    # Offline for this long: an alarm (cleared when the device returns).
    alarm_after_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 600

    @model_validator(mode="after")
    def _timeout_spans_two_heartbeats(self) -> Self:
        if self.timeout_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s:g}) must be at least twice heartbeat_s ({self.heartbeat_s:g}), "
                "so that one lost heartbeat never makes a device offline"
            )
        return self


class AvailabilitySettings(_Section):
    """Heartbeat, timeout and alarm threshold per device kind (issue 6)."""

    speaker: KindAvailabilitySettings = KindAvailabilitySettings()
    wired_zone: KindAvailabilitySettings = KindAvailabilitySettings()
    led_screen: KindAvailabilitySettings = KindAvailabilitySettings()
    # A sensor silent during a flood matters sooner than a silent loudspeaker.
    sensor: KindAvailabilitySettings = KindAvailabilitySettings(alarm_after_s=300)


class OperationsSettings(_Section):
    """Remote operations on devices (issue 6): volume, reboot, test tone, configuration."""

    # A command not delivered within this long is not carried out any more (a reboot an hour late
    # would surprise the ward); the device's result is awaited this long plus dispatch.completion_grace_s.
    expiry_s: Annotated[int, Field(ge=10, le=86_400)] = 600


SIGNING_KEY_FILE = "command-signing.key"


class SigningSettings(_Section):
    """The controller's Ed25519 key for signing what it sends devices (docs/protocol.md §1.15)."""

    # PKCS #8 PEM, mode 0600; generated there on first use. None: `command-signing.key` in `data_dir`.
    key_file: Path | None = None

    @field_validator("key_file")
    @classmethod
    def _a_file_path(cls, value: Path | None) -> Path | None:
        if value is not None and (value.is_dir() or not value.name):
            raise ValueError(f"{value} is a directory; expected the path of the key file")
        return value


_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")


def parse_window(text: str) -> tuple[time, time]:
    """`HH:MM-HH:MM` (local time; may wrap past midnight, e.g. `23:00-03:00`) to its two ends."""
    match = _WINDOW.fullmatch(text.strip())
    if match is None:
        raise ValueError("write the window as HH:MM-HH:MM, e.g. 01:00-04:00")
    start = time(int(match.group(1)), int(match.group(2)))
    end = time(int(match.group(3)), int(match.group(4)))
    if start == end:
        raise ValueError("a window's start and end must differ (omit it for no window)")
    return start, end


def decode_public_key(text: str) -> bytes:
    """A raw 32-byte Ed25519 public key from its standard base64 (what `wardcast firmware keygen` prints)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("is not base64") from error
    if len(raw) != 32:  # noqa: PLR2004  (an Ed25519 public key is 32 bytes by definition)
        raise ValueError(f"decodes to {len(raw)} bytes; an Ed25519 public key is 32")
    return raw


class FirmwareSettings(_Section):
    """Firmware images and staged rollouts (issue 6, docs/protocol.md §1.16)."""

    dir: Path = Path("var/firmware")
    max_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    # Ed25519 public keys (base64 of the raw 32 bytes) whose signatures make an image acceptable; the
    # private keys stay with whoever builds images. Empty: every upload is refused.
    trusted_keys: tuple[str, ...] = ()
    # When new device updates may start, local time (`timezone`); a rollout may set its own. None: any time.
    maintenance_window: str | None = "01:00-04:00"
    # A device that says nothing for this long in a step is failed by timeout: from the command to
    # `downloading` and from `verified` to `updating`; the whole download; the install and reboot.
    start_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    download_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 1800.0
    install_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 900.0
    # How often running rollouts are looked at (timeouts, the window opening) besides every report.
    tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    @field_validator("trusted_keys")
    @classmethod
    def _keys_decode(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, key in enumerate(value):
            try:
                decode_public_key(key)
            except ValueError as error:
                raise ValueError(f"trusted_keys[{index}] {error}") from error
        return value

    @field_validator("maintenance_window")
    @classmethod
    def _window_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    def public_keys(self) -> list[bytes]:
        return [decode_public_key(key) for key in self.trusted_keys]


class MapSettings(_Section):
    """The console's map (Leaflet). No tile URL: the map draws devices and areas on a plain background,
    which works with no internet; set one to a tile server the city runs or may use."""

    tile_url: str | None = Field(
        default=None, description="XYZ tile template, e.g. https://tiles.example/{z}/{x}/{y}.png"
    )
    attribution: str = Field(default="", max_length=300)
    max_zoom: Annotated[int, Field(ge=1, le=22)] = 19
    # Where the map opens when no device has coordinates yet.
    center_lat: Annotated[float, Field(ge=-90, le=90)] = 21.0285
    center_lon: Annotated[float, Field(ge=-180, le=180)] = 105.8542
    zoom: Annotated[int, Field(ge=1, le=22)] = 13

    @field_validator("tile_url")
    @classmethod
    def _tile_template(cls, value: str | None) -> str | None:
        if value is not None and not all(part in value for part in ("{z}", "{x}", "{y}")):
            raise ValueError("must contain {z}, {x} and {y}")
        return value


class ConsoleSettings(_Section):
    """The web console (issue 7)."""

    map: MapSettings = MapSettings()


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WARDCAST_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    timezone: str = "Asia/Ho_Chi_Minh"
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    mqtt: MqttSettings = MqttSettings()
    media: MediaSettings = MediaSettings()
    alerts: AlertSettings = AlertSettings()
    dispatch: DispatchSettings = DispatchSettings()
    schedules: SchedulesSettings = SchedulesSettings()
    tts: TtsSettings = TtsSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    provisioning: ProvisioningSettings = ProvisioningSettings()
    availability: AvailabilitySettings = AvailabilitySettings()
    operations: OperationsSettings = OperationsSettings()
    firmware: FirmwareSettings = FirmwareSettings()
    logging: LoggingSettings = LoggingSettings()
    console: ConsoleSettings = ConsoleSettings()
    signing: SigningSettings = SigningSettings()
    data_dir: Path = Path("var")

    @property
    def signing_key_file(self) -> Path:
        """Where the command-signing key is (or will be generated)."""
        return (
            self.signing.key_file if self.signing.key_file is not None else self.data_dir / SIGNING_KEY_FILE
        )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {value!r}") from error
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003  (no .env files: config.yaml + env)
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get(CONFIG_ENV_VAR)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(
                YamlConfigSettingsSource(settings_cls, yaml_file=config_file, yaml_file_encoding="utf-8")
            )
        return tuple(sources)


class ConfigError(Exception):
    """The configuration is invalid; `str()` lists every key at fault."""


def _key_of(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "(root)"


def load_settings(config_file: Path | None = None) -> Settings:
    """Read `config_file` (or $WARDCAST_CONFIG) and the environment; raise ConfigError naming each key."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        os.environ[CONFIG_ENV_VAR] = str(config_file)
    try:
        return Settings()
    except ValidationError as error:
        problems = [f"{_key_of(item['loc'])}: {item['msg']}" for item in error.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from error
    except (OSError, ValueError) as error:  # unreadable file, YAML syntax error
        raise ConfigError(f"cannot read configuration: {error}") from error
