"""A sensor as the broker sees it: its own client id, the device account, publishing telemetry."""

from __future__ import annotations

import json
import threading
from datetime import datetime

import paho.mqtt.client as paho

from tests.support.broker import TestBroker

WAIT_S = 30.0


class SensorClient:
    def __init__(self, broker: TestBroker, address: str) -> None:
        self._address = address
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=address)
        self._client.username_pw_set(broker.simulator.username, broker.simulator.password)
        connected = threading.Event()
        self._client.on_connect = lambda *_args: connected.set()
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert connected.wait(WAIT_S), "the sensor did not connect"

    def readings(self, at: datetime, **values: float) -> None:
        document = {
            "v": 1,
            "at": at.isoformat().replace("+00:00", "Z"),
            "readings": [{"metric": metric, "value": value} for metric, value in values.items()],
        }
        info = self._client.publish(f"wardcast/v1/dev/{self._address}/telemetry", json.dumps(document), qos=1)
        info.wait_for_publish(WAIT_S)

    def raw(self, payload: bytes) -> None:
        self._client.publish(f"wardcast/v1/dev/{self._address}/telemetry", payload, qos=1).wait_for_publish(
            WAIT_S
        )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
