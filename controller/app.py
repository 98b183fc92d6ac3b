"""One controller process: database, broker link, dispatcher and the services the API calls."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import text
from sqlmodel import Session, col, select

from controller.broker import RELOAD_PROBE_USERNAME, BrokerAccount, ManagedMosquitto, write_private
from controller.domain.areas import AreaTree
from controller.domain.broker_access import ServiceAccounts
from controller.domain.clock import Clock, SystemClock
from controller.services.alerts import AlertService
from controller.services.area_fanout import AreaFollowers
from controller.services.audit import AuditLog
from controller.services.auth import Principal, authenticate
from controller.services.availability import AvailabilityService
from controller.services.broadcasts import WIRED_ZONE_KIND, BroadcastService
from controller.services.cap_intake import CapIntake
from controller.services.command_signing import (
    CommandSigner,
    ReservedSequence,
    load_or_create_signing_key,
    reserve_sequence_block,
)
from controller.services.device_programmes import DeviceProgrammes
from controller.services.dispatcher import Dispatcher
from controller.services.events import EventBus
from controller.services.field_sensors import COAP, MODBUS, CoapAdapter, FieldSensors, ModbusAdapter
from controller.services.firmware import FirmwareStore
from controller.services.inbound import DeviceDirectory, InboundProcessor
from controller.services.ingest import IngestWorkers
from controller.services.media import MediaStore
from controller.services.operations import OperationService
from controller.services.provisioning import (
    BrokerAccess,
    BrokerEndpoint,
    ClaimListener,
    ExternalBrokerFiles,
    ProvisioningService,
)
from controller.services.rate_limit import RateLimiter
from controller.services.rollouts import RolloutService
from controller.services.rules import RuleEngine
from controller.services.schedule_runner import ScheduleRunner
from controller.services.schedules import ScheduleService
from controller.services.serial_signs import TRANSPORT as SERIAL
from controller.services.serial_signs import SerialSigns
from controller.services.targets import load_area_tree
from controller.services.telemetry import TelemetryPipeline
from controller.services.tracker import DeliveryTracker, TrackedDelivery
from controller.services.webhooks import AlertWebhooks
from controller.services.wired_zones import WiredZoneRouter
from controller.settings import MqttSettings, Settings
from controller.store.db import create_db_engine, migrate
from controller.store.models import DeviceRow
from drivers.coap import CoapDriver
from drivers.modbus_field import ModbusDriver
from drivers.mqtt import MqttDriver, parse_broker_url
from drivers.mqtt_codec import CONTROLLER_SUBSCRIPTIONS, schedule_topic

log = structlog.get_logger(__name__)

CONTROLLER_ACCOUNT = "controller"


def service_account_names(mqtt: MqttSettings) -> list[str]:
    """The broker's non-device accounts this configuration uses: the controller's, then the simulator's
    and the claim account's when they are enabled."""
    names = [CONTROLLER_ACCOUNT if mqtt.mode == "managed" else str(mqtt.username)]
    names += [account.username for account in (mqtt.simulator, mqtt.claim) if account.enabled]
    return names


def managed_broker_accounts(state_dir: Path, names: list[str] | None = None) -> dict[str, BrokerAccount]:
    """The managed broker's service accounts, generated once and kept (mode 0600) under its state dir;
    an account named later is added to the file."""
    path = state_dir / "credentials.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = names if names is not None else list(stored) or [CONTROLLER_ACCOUNT]
    missing = [name for name in wanted if name not in stored]
    if missing:
        stored.update({name: secrets.token_urlsafe(24) for name in missing})
        state_dir.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(stored))
    return {name: BrokerAccount(name, stored[name]) for name in wanted}


class Runtime:
    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.engine = create_db_engine(settings.database.url, echo=settings.database.echo)
        self.bus = EventBus()
        self.media_store = MediaStore(settings.media.dir, settings.media.max_bytes)
        self.firmware_images = FirmwareStore(
            self.engine, self.clock, settings.firmware.dir, max_bytes=settings.firmware.max_bytes
        )
        self._rollouts: RolloutService | None = None
        self.directory = DeviceDirectory(self.engine)
        self.area_followers = AreaFollowers()
        self.tracker = DeliveryTracker(
            self.engine, self.bus, self.clock, completion_grace_s=settings.dispatch.completion_grace_s
        )
        self.broker: ManagedMosquitto | None = None
        self.broker_access = BrokerAccess(self.engine, None)
        self._provisioning: ProvisioningService | None = None
        self.claims: ClaimListener | None = None
        self.driver: MqttDriver | None = None
        self._dispatcher: Dispatcher | None = None
        self._broadcasts: BroadcastService | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._area_tree: AreaTree | None = None
        self._inbound: InboundProcessor | None = None
        self.schedules = ScheduleService(self.engine, settings.schedules, now=self.clock.now)
        self.schedule_runner: ScheduleRunner | None = None
        self.device_programmes: DeviceProgrammes | None = None
        self.audit = AuditLog(self.engine, self.clock)
        self.rate_limiter = RateLimiter(settings.alerts.rate_limit_per_minute)
        self._alerts: AlertService | None = None
        self._cap_intake: CapIntake | None = None
        self.telemetry = TelemetryPipeline(self.engine, self.clock, settings.telemetry)
        self.availability = AvailabilityService(
            self.engine, self.bus, self.audit, self.clock, settings.availability
        )
        self.serial_signs = SerialSigns(
            self.directory, self.tracker, self.clock, self.telemetry, availability=self.availability
        )
        # One Modbus driver for sensors and wired zones alike: a link's lock holds across both.
        self.modbus_driver = ModbusDriver()
        self.field_sensors = {
            transport: FieldSensors(
                transport,
                adapter,
                self.engine,
                self.directory,
                self.tracker,
                self.clock,
                self.telemetry,
                availability=self.availability,
            )
            for transport, adapter in (
                (MODBUS, ModbusAdapter(self.modbus_driver)),
                (COAP, CoapAdapter(CoapDriver())),
            )
        }
        self._background: set[asyncio.Task[None]] = set()
        self.wired_zones: WiredZoneRouter | None = None
        self._rules: RuleEngine | None = None
        self._operations: OperationService | None = None
        self.ingest: IngestWorkers | None = None
        self._signer: CommandSigner | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.engine)
        # Before any message from a device: availability judges each against what was recorded.
        await asyncio.to_thread(self.availability.load)
        # Before the broker: a key that cannot be used stops the controller naming `signing.key_file`.
        private_key = await asyncio.to_thread(load_or_create_signing_key, self.settings.signing_key_file)
        engine = self.engine
        signer = self._signer = CommandSigner(
            private_key, ReservedSequence(lambda size: reserve_sequence_block(engine, size))
        )
        url, username, password = await asyncio.to_thread(self._broker_endpoint)
        workers = self.settings.telemetry.ingest_workers
        self.driver = MqttDriver(
            url=url,
            username=username,
            password=password,
            client_id=self.settings.mqtt.client_id,
            protocol=self.settings.mqtt.protocol,
            keepalive_s=self.settings.mqtt.keepalive_s,
            subscriptions=[
                topic for topic in CONTROLLER_SUBSCRIPTIONS if not (workers and topic.endswith("/telemetry"))
            ],
        )
        await self.driver.__aenter__()
        self._provisioning = ProvisioningService(
            self.engine,
            self.clock,
            broker=self._bundle_endpoint(url),
            reserved_usernames=[*service_account_names(self.settings.mqtt), RELOAD_PROBE_USERNAME],
            claim_window_s=self.settings.provisioning.claim_window_s,
            claim_clock_skew_s=self.settings.provisioning.claim_clock_skew_s,
            # Every bundle carries the key its device verifies commands with (docs/protocol.md §1.15).
            command_public_key=signer.public_key,
        )
        if self.settings.mqtt.claim.enabled:
            host, port = parse_broker_url(url)
            self.claims = ClaimListener(
                self._provisioning,
                host=host,
                port=port,
                account=BrokerAccount(username, password),
                client_id=f"{self.settings.mqtt.client_id}-claims",
            )
        router = self.wired_zones = WiredZoneRouter(
            self.driver, self.modbus_driver, signer=signer, signs=self.serial_signs
        )
        self._dispatcher = Dispatcher(
            self.engine,
            router,
            self.tracker,
            self.clock,
            publish_timeout_s=self.settings.dispatch.publish_timeout_s,
        )
        dispatcher = self._dispatcher
        operations = self._operations = OperationService(
            self.engine,
            dispatcher,
            self.audit,
            self.bus,
            self.clock,
            expiry_s=self.settings.operations.expiry_s,
            result_grace_s=self.settings.dispatch.completion_grace_s,
            utc_offset_min=_utc_offset_min(self.settings.timezone),
            programmes_changed=self.device_programmes_changed,
        )
        await asyncio.to_thread(operations.load)
        self.driver.add_link_listener(lambda state: dispatcher.link_changed(up=state == "connected"))
        dispatcher.link_changed(up=self.driver.link_state == "connected")
        self._broadcasts = BroadcastService(
            self.engine,
            self._dispatcher,
            self.tracker,
            self.clock,
            media_base_url=self.settings.http.base_url(),
            default_expiry_s=self.settings.dispatch.default_expiry_s,
            followers=self.area_followers if self.settings.dispatch.area_fanout else None,
        )
        broadcasts = self._broadcasts
        rollouts = self._rollouts = RolloutService(
            self.engine,
            self._dispatcher,
            self.firmware_images,
            self.bus,
            self.audit,
            self.clock,
            self.settings.firmware,
            timezone=self.settings.timezone,
            base_url=self.settings.http.base_url(),
        )
        await asyncio.to_thread(rollouts.load)

        def delivery_ended(delivery: TrackedDelivery) -> None:
            router.delivery_ended(delivery)
            broadcasts.delivery_ended(delivery)

        self.tracker.on_ended = delivery_ended
        self._alerts = AlertService(
            self.engine,
            self._broadcasts,
            self.audit,
            self.media_store,
            self.clock,
            settings=self.settings.alerts,
            tts=self.settings.tts,
        )
        self._cap_intake = CapIntake(self._alerts, self.settings.alerts, self.clock)
        rules = self._rules = RuleEngine(self.engine, self.bus, self.audit, self.clock, self._alerts)
        await asyncio.to_thread(rules.load)
        await asyncio.to_thread(self.telemetry.load)
        self.telemetry.add_listener(rules.observe)
        if workers:
            ingest = self.ingest = IngestWorkers(
                workers,
                database_url=self.settings.database.url,
                broker_url=url,
                username=username,
                password=password,
                client_id=self.settings.mqtt.client_id,
                telemetry=self.settings.telemetry,
                logging=self.settings.logging,
                on_reading=rules.observe,
            )
            ingest.watch(rules.watched_metrics)
            rules.on_watch_changed = ingest.watch
            await ingest.start()
        webhooks = AlertWebhooks(self.bus, self.settings.alerts, self.clock, progress=self._alerts.progress)
        self._alerts.on_dispatched = webhooks.watch
        for alert_id, broadcast_id, url in await asyncio.to_thread(self._alerts.webhooks_to_resume):
            webhooks.watch(alert_id, broadcast_id, url)
        self.schedule_runner = ScheduleRunner(
            self.engine, self._broadcasts, self.settings.schedules, self.clock
        )
        driver = self.driver

        async def publish_programme(address: str, document: Mapping[str, Any] | None) -> None:
            # None only empties the broker's retained copy (a removed device): devices ignore an empty,
            # unsigned payload; a disabled one gets a signed programme with nothing in it instead.
            signed = None if document is None else await signer.sign_programme(document)
            await driver.publish_retained(schedule_topic(address), signed, timeout=10.0)

        programmes = self.device_programmes = DeviceProgrammes(
            self.engine,
            self.settings.schedules,
            self.clock,
            media_base_url=self.settings.http.base_url(),
            publish=publish_programme,
        )
        # A broker restarted without persistence has lost the retained programmes.
        self.driver.add_link_listener(
            lambda state: programmes.link_restored() if state == "connected" else None
        )
        await asyncio.to_thread(self.directory.reload)
        await asyncio.to_thread(self.area_followers.load, self.engine)
        await asyncio.to_thread(self.tracker.load_open_deliveries)
        # Before any command goes out: a resumed play on a wired zone must find its box.
        for sensors in self.field_sensors.values():
            await sensors.start()
        for device_id, kind, transport, address, config in await asyncio.to_thread(self._enabled_devices):
            if kind == WIRED_ZONE_KIND:
                await router.configure(device_id, address, config)
            elif transport == SERIAL:
                await self.serial_signs.device_changed(device_id, address, config)
        pending = await asyncio.to_thread(self._dispatcher.load_outbox)
        if pending:
            log.info("resuming commands from the outbox", count=len(pending))
        self._dispatcher.submit(pending)
        inbound = self._inbound = InboundProcessor(
            "mqtt",
            self.directory,
            self.tracker,
            self.clock,
            followers=self.area_followers,
            telemetry=self.telemetry,
            availability=self.availability,
            operations=operations,
        )
        inbound.report_takers.append(rollouts.report)
        await self.schedule_runner.start()
        self._tasks = [
            asyncio.create_task(self.tracker.run(), name="tracker"),
            asyncio.create_task(inbound.run(self.driver.events()), name="inbound"),
            asyncio.create_task(programmes.run(), name="device-programmes"),
            asyncio.create_task(webhooks.run(), name="alert-webhooks"),
            asyncio.create_task(self.telemetry.run(), name="telemetry"),
            asyncio.create_task(rules.run(), name="rules"),
            asyncio.create_task(self.availability.run(), name="availability"),
            asyncio.create_task(operations.run(), name="operations"),
            asyncio.create_task(rollouts.run(), name="rollouts"),
        ]
        if self.claims is not None:
            self._tasks.append(asyncio.create_task(self.claims.run(), name="claims"))
        log.info("controller started", broker=url, database=self.engine.url.render_as_string())

    def _enabled_devices(self) -> list[tuple[str, str, str, str, dict[str, Any]]]:
        """(id, kind, transport, address, config) of the enabled wired zones and serial signs."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeviceRow).where(
                    col(DeviceRow.enabled),
                    (col(DeviceRow.kind) == WIRED_ZONE_KIND) | (col(DeviceRow.transport) == SERIAL),
                )
            ).all()
        return [(row.id, row.kind, row.transport, row.address, dict(row.config)) for row in rows]

    def _service_passwords(self) -> dict[str, str]:
        """Each service account's password: configured, or (managed mode) generated and kept."""
        mqtt = self.settings.mqtt
        names = service_account_names(mqtt)
        generated = (
            {n: a.password for n, a in managed_broker_accounts(mqtt.managed.state_dir, names).items()}
            if mqtt.mode == "managed"
            else {}
        )
        configured = {
            account.username: account.password.get_secret_value()
            for account in (mqtt.simulator, mqtt.claim)
            if account.enabled and account.password is not None
        }
        if mqtt.mode == "external" and mqtt.password is not None:
            configured[str(mqtt.username)] = mqtt.password.get_secret_value()
        return {name: configured.get(name) or generated[name] for name in names}

    def _broker_endpoint(self) -> tuple[str, str, str]:
        mqtt = self.settings.mqtt
        passwords = self._service_passwords()
        accounts = ServiceAccounts(
            controller=service_account_names(mqtt)[0],
            simulator=mqtt.simulator.username if mqtt.simulator.enabled else None,
            claim=mqtt.claim.username if mqtt.claim.enabled else None,
        )
        if mqtt.mode == "external":
            if mqtt.url is None or mqtt.username is None or mqtt.password is None:
                raise RuntimeError("mqtt.url, mqtt.username and mqtt.password are required in external mode")
            host, port = parse_broker_url(mqtt.url)
            access = mqtt.external_access
            if access.password_file is not None and access.acl_file is not None:
                files = ExternalBrokerFiles(
                    password_file=access.password_file,
                    acl_file=access.acl_file,
                    reload_command=access.reload_command,
                    accounts=accounts,
                    service_passwords=passwords,
                    host=host,
                    port=port,
                )
                self.broker_access = BrokerAccess(self.engine, files.apply)
                self.broker_access.apply_now()
            else:
                log.warning(
                    "device broker accounts are not pushed to the external broker "
                    "(set mqtt.external_access to have the controller write its password and ACL files)"
                )
            return mqtt.url, mqtt.username, mqtt.password.get_secret_value()
        self.broker = ManagedMosquitto(
            mqtt.managed.state_dir,
            host=mqtt.managed.host,
            port=mqtt.managed.port,
            accounts=[BrokerAccount(name, password) for name, password in passwords.items()],
            controller_username=accounts.controller,
            simulator_username=accounts.simulator,
            claim_username=accounts.claim,
        )
        self.broker_access = BrokerAccess(self.engine, self.broker.set_device_credentials)
        self.broker_access.apply_now()  # before the start: the broker starts with every device's account
        self.broker.start()
        return self.broker.url, accounts.controller, passwords[accounts.controller]

    def _bundle_endpoint(self, url: str) -> BrokerEndpoint:
        provisioning = self.settings.provisioning
        host, port = parse_broker_url(url)
        return BrokerEndpoint(provisioning.broker_host or host, provisioning.broker_port or port)

    async def stop(self) -> None:
        if self.schedule_runner is not None:
            self.schedule_runner.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sensors in self.field_sensors.values():
            await sensors.stop()
        await self.serial_signs.stop()
        if self.ingest is not None:
            await self.ingest.stop()
        if self._dispatcher is not None:
            await self._dispatcher.close()
        await self.tracker.flush()
        await self.telemetry.flush()
        await self.availability.flush()
        if self._operations is not None:
            await self._operations.flush()
        if self.driver is not None:
            await self.driver.__aexit__(None, None, None)
            self.driver = None
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        self.bus.close()
        self.engine.dispose()

    # -- services for the API ------------------------------------------------------------------
    @property
    def broadcasts(self) -> BroadcastService:
        if self._broadcasts is None:
            raise RuntimeError("the controller is not started")
        return self._broadcasts

    @property
    def rollouts(self) -> RolloutService:
        if self._rollouts is None:
            raise RuntimeError("the controller is not started")
        return self._rollouts

    @property
    def provisioning(self) -> ProvisioningService:
        if self._provisioning is None:
            raise RuntimeError("the controller is not started")
        return self._provisioning

    @property
    def signer(self) -> CommandSigner:
        if self._signer is None:
            raise RuntimeError("the controller is not started")
        return self._signer

    @property
    def alerts(self) -> AlertService:
        if self._alerts is None:
            raise RuntimeError("the controller is not started")
        return self._alerts

    @property
    def rules(self) -> RuleEngine:
        if self._rules is None:
            raise RuntimeError("the controller is not started")
        return self._rules

    @property
    def operations(self) -> OperationService:
        if self._operations is None:
            raise RuntimeError("the controller is not started")
        return self._operations

    @property
    def cap_intake(self) -> CapIntake:
        if self._cap_intake is None:
            raise RuntimeError("the controller is not started")
        return self._cap_intake

    async def authenticate(self, token: str) -> Principal | None:
        return await asyncio.to_thread(authenticate, self.engine, token)

    def area_tree(self) -> AreaTree:
        if self._area_tree is None:
            with Session(self.engine) as session:
                self._area_tree = load_area_tree(session)
        return self._area_tree

    def device_registered(
        self,
        transport: str,
        address: str,
        device_id: str,
        config: Mapping[str, Any] | None = None,
        *,
        enabled: bool = True,
        kind: str | None = None,
        created: bool = False,
    ) -> None:
        self.directory.put(transport, address, device_id)
        if kind is not None:
            self.availability.register(device_id, kind)
        self.telemetry.device_changed(device_id, config or {})
        if self.ingest is not None:
            self.ingest.devices_changed()
        if self._inbound is not None and transport == "mqtt":
            self._inbound.device_registered(address)
        if transport == SERIAL:
            self._in_background(
                self.serial_signs.device_changed(
                    device_id, address, config if enabled else None, set_up=created
                )
            )
        sensors = self.field_sensors.get(transport)
        if sensors is not None:
            self._in_background(sensors.device_changed(device_id, address, config if enabled else None))
        if self.wired_zones is not None and kind == WIRED_ZONE_KIND:
            self._in_background(self.wired_zones.configure(device_id, address, config if enabled else None))

    def device_removed(self, device_id: str) -> None:
        self.directory.remove(device_id)
        self.availability.forget(device_id)
        self.telemetry.device_changed(device_id, None)
        if self.ingest is not None:
            self.ingest.devices_changed()
        for sensors in self.field_sensors.values():
            self._in_background(sensors.device_changed(device_id, "", None))
        self._in_background(self.serial_signs.device_changed(device_id, "", None))
        if self.wired_zones is not None:  # a no-op for a device that is not a wired zone
            self._in_background(self.wired_zones.configure(device_id, "", None))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def replan_schedule(self, schedule_id: str) -> None:
        if self.schedule_runner is not None:
            await self.schedule_runner.replan(schedule_id)
        self.device_programmes_changed()

    def device_programmes_changed(self) -> None:
        if self.device_programmes is not None:
            self.device_programmes.changed()

    def invalidate_areas(self) -> None:
        self._area_tree = None

    def visible_device_ids(self, principal: Principal) -> frozenset[str] | None:
        """The devices of the key's ward (ward_staff) or assigned wards (technician); None: all."""
        wards = principal.device_wards()
        if wards is None:
            return None
        tree = self.area_tree()
        codes = frozenset(code for ward in wards if ward in tree for code in tree.subtree_codes(ward))
        with Session(self.engine) as session:
            rows = session.exec(select(DeviceRow.id, DeviceRow.area_code)).all()
        return frozenset(device_id for device_id, area in rows if area in codes)

    async def health(self) -> dict[str, Any]:
        def database() -> str:
            try:
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            except Exception as error:  # noqa: BLE001  (any failure means unhealthy; say which)
                return f"error: {error}"
            return "ok"

        broker = "ok" if self.driver is not None and await self.driver.ping() else "disconnected"
        return {"database": await asyncio.to_thread(database), "broker": broker}


def _utc_offset_min(timezone: str) -> int:
    """The city's offset from UTC now, in minutes (sent with quiet hours, docs/protocol.md §1.14)."""
    offset = datetime.now(ZoneInfo(timezone)).utcoffset()
    return int(offset.total_seconds() // 60) if offset is not None else 0
