import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import TestBroker


def _connect(broker: TestBroker, client_id: str, username: str | None, password: str | None) -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if username is not None:
        client.username_pw_set(username, password)
    try:
        client.connect(broker.host, broker.port)
        result: list[int] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: result.append(reason.value)
        while not result:
            client.loop(timeout=0.1)
        return result[0]
    finally:
        client.disconnect()
        client.loop(timeout=0.1)
        client.socket() and client.socket().close()  # type: ignore[union-attr]


def test_anonymous_is_refused(mosquitto: TestBroker) -> None:
    assert _connect(mosquitto, "anon", None, None) != 0


def test_wrong_password_is_refused(mosquitto: TestBroker) -> None:
    assert _connect(mosquitto, "spk-1", mosquitto.device.username, "wrong") != 0


@pytest.mark.parametrize("who", ["controller", "device"])
def test_accounts_connect(mosquitto: TestBroker, who: str) -> None:
    account = getattr(mosquitto, who)
    assert _connect(mosquitto, "spk-1", account.username, account.password) == 0
