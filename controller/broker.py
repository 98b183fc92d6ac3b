"""A Mosquitto broker that Wardcast configures, starts and stops itself (`mqtt.mode: managed`).

The same code gives the tests their own broker on a free port, with authentication and an ACL that
confines every device to its own topics (docs/protocol.md §1.7).
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from controller.domain.broker_access import ServiceAccounts, acl_text, password_file_text

MOSQUITTO_INSTALL_HINT = "apt-get install -y mosquitto"
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for its $7$ (PBKDF2-SHA512) format


class BrokerError(RuntimeError):
    """The managed broker could not be configured or started."""


@dataclass(frozen=True, slots=True)
class BrokerAccount:
    username: str
    password: str


def mosquitto_password_hash(password: str) -> str:
    """A password in Mosquitto 2's `$7$` format (PBKDF2-SHA512, base64 salt and hash)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    salt_b64 = base64.b64encode(salt).decode()
    hash_b64 = base64.b64encode(digest).decode()
    return f"$7${_PBKDF2_ITERATIONS}${salt_b64}${hash_b64}"


def mosquitto_password_matches(password: str, password_hash: str) -> bool:
    """Whether `password` is the one `password_hash` (`$7$…`) was made from."""
    try:
        _, kind, iterations, salt_b64, hash_b64 = password_hash.split("$")
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
    except ValueError:
        return False
    if kind != "7":
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations))
    return hmac.compare_digest(digest, expected)


def mosquitto_password_line(account: BrokerAccount) -> str:
    """One `password_file` line for `account`."""
    return f"{account.username}:{mosquitto_password_hash(account.password)}"


# A service account whose password changes at every reload: once the broker accepts the new one, it
# has read the new files (and disconnected every client they no longer admit). Its username cannot be
# a device address (a dot), and the ACL denies it every topic.
RELOAD_PROBE_USERNAME = "wardcast.reload-probe"


def access_files(
    accounts: ServiceAccounts, service_hashes: Mapping[str, str], device_hashes: Mapping[str, str]
) -> tuple[str, str, BrokerAccount]:
    """(password file, ACL file, the reload probe's fresh account) for the broker to load."""
    clash = sorted(accounts.names() & device_hashes.keys())
    if clash:
        raise BrokerError(f"device accounts may not take a service account's name: {', '.join(clash)}")
    probe = BrokerAccount(RELOAD_PROBE_USERNAME, secrets.token_urlsafe(18))
    passwords = password_file_text(
        {**device_hashes, **service_hashes, probe.username: mosquitto_password_hash(probe.password)}
    )
    acl = acl_text(accounts) + f"user {RELOAD_PROBE_USERNAME}\ntopic deny #\n"
    return passwords, acl, probe


def write_private(path: Path, text: str) -> None:
    """Replace `path` at once (a broker reading it mid-write would see half a file), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.chmod(0o600)
    temporary.replace(path)


def wait_until_accepted(host: str, port: int, account: BrokerAccount, timeout: float = 10.0) -> None:
    """Return once the broker accepts `account`; BrokerError if it still refuses it after `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        client.username_pw_set(account.username, account.password)
        answers: list[str] = []

        def on_connect(*arguments: Any, answers: list[str] = answers) -> None:
            answers.append(str(arguments[3]))  # (client, userdata, flags, reason code, properties)

        client.on_connect = on_connect
        try:
            client.connect(host, port, keepalive=10)
            while not answers and time.monotonic() < deadline:
                client.loop(timeout=0.05)
        except OSError as error:
            last = str(error)
        finally:
            client.disconnect()
            with contextlib.suppress(OSError):
                client.loop(timeout=0.01)
            socket_ = client.socket()
            if isinstance(socket_, socket.socket):
                socket_.close()
        if answers and answers[0] == "Success":
            return
        last = answers[0] if answers else last
        time.sleep(0.02)  # the broker has not reloaded yet; it signals nothing we could wait on
    raise BrokerError(f"the broker did not take its new password file within {timeout} s ({last})")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (
            candidate
            for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
            if Path(candidate).exists()
        ),
        None,
    )
    if found is None:
        raise BrokerError(f"the mosquitto binary is missing; install it with: {MOSQUITTO_INSTALL_HINT}")
    return found


class ManagedMosquitto:
    """Writes a config, password and ACL file under `state_dir` and runs Mosquitto on `host:port`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        accounts: list[BrokerAccount],
        controller_username: str,
        simulator_username: str | None = None,
        claim_username: str | None = None,
        persistence: bool = True,
    ) -> None:
        """`accounts` are the service accounts (the controller's, and the simulator's and the claim
        account's when those are on); devices' accounts come from `set_device_credentials`."""
        self.state_dir = state_dir
        self.host = host
        self.port = port or free_tcp_port(host)
        self.service_accounts = ServiceAccounts(
            controller=controller_username, simulator=simulator_username, claim=claim_username
        )
        missing = self.service_accounts.names() - {a.username for a in accounts}
        if missing:
            raise BrokerError(f"no password given for the account(s) {', '.join(sorted(missing))}")
        self._service_hashes = {a.username: mosquitto_password_hash(a.password) for a in accounts}
        self._device_hashes: dict[str, str] = {}
        self._persistence = persistence
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def password_path(self) -> Path:
        return self.state_dir / "passwords"

    @property
    def acl_path(self) -> Path:
        return self.state_dir / "acl"

    def _write_access_files(self) -> BrokerAccount:
        passwords, acl, probe = access_files(self.service_accounts, self._service_hashes, self._device_hashes)
        write_private(self.password_path, passwords)
        write_private(self.acl_path, acl)
        return probe

    def write_files(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        password_path, acl_path = self.password_path, self.acl_path
        self._write_access_files()
        persistence_dir = self.state_dir / "data"
        persistence_dir.mkdir(exist_ok=True)
        lines = [
            # As root Mosquitto would switch to the `mosquitto` user, who cannot read our state dir.
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {password_path}",
            f"acl_file {acl_path}",
            f"listener {self.port} {self.host}",
            # The controller's one session receives every device's reports; at 10,000 devices a
            # broadcast brings ~50,000 of them, which must queue rather than be dropped.
            "max_queued_messages 200000",
            "max_inflight_messages 100",
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {persistence_dir}/",
            "autosave_interval 5",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages false",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        self.write_files()
        stderr_path = self.state_dir / "mosquitto.stderr"
        with stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = stderr_path.read_text(errors="replace")
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise BrokerError(f"mosquitto exited with {self._process.returncode}: {output}{log}".strip())
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)  # polling a port that is not listening yet; no event to wait on
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    def reload(self) -> None:
        """Re-read the password and ACL files without dropping connections (SIGHUP), and return once
        Mosquitto has taken them: a client they no longer admit is disconnected by then."""
        if self._process is not None and self._process.poll() is None:
            probe = self._write_access_files()
            self._process.send_signal(signal.SIGHUP)
            wait_until_accepted(self.host, self.port, probe)

    def set_device_credentials(self, hashes: Mapping[str, str]) -> None:
        """Every device account (username → `$7$` hash), replacing the previous set, then reload."""
        self._device_hashes = dict(hashes)
        self.reload()

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (tests)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
