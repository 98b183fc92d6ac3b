"""A Mosquitto broker that Wardcast configures, starts and stops itself (`mqtt.mode: managed`).

The same code gives the tests their own broker on a free port, with authentication and an ACL that
confines every device to its own topics (docs/protocol.md §1.7).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

MOSQUITTO_INSTALL_HINT = "apt-get install -y mosquitto"
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for its $7$ (PBKDF2-SHA512) format


class BrokerError(RuntimeError):
    """The managed broker could not be configured or started."""


@dataclass(frozen=True, slots=True)
class BrokerAccount:
    username: str
    password: str


def mosquitto_password_line(account: BrokerAccount) -> str:
    """One `password_file` line in Mosquitto 2's `$7$` format (PBKDF2-SHA512, base64 salt and hash)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", account.password.encode(), salt, _PBKDF2_ITERATIONS)
    salt_b64 = base64.b64encode(salt).decode()
    hash_b64 = base64.b64encode(digest).decode()
    return f"{account.username}:$7${_PBKDF2_ITERATIONS}${salt_b64}${hash_b64}"


def acl_text(controller_username: str, topic_root: str = "wardcast/v1") -> str:
    """The ACL of docs/protocol.md §1.7: the controller everywhere, each device only on its own topics."""
    return "\n".join(
        [
            f"user {controller_username}",
            "topic readwrite wardcast/#",
            "",
            "# Every other account is a device, confined by its client id (= its address).",
            f"pattern write {topic_root}/dev/%c/ack",
            f"pattern write {topic_root}/dev/%c/state",
            f"pattern write {topic_root}/dev/%c/telemetry",
            f"pattern read {topic_root}/dev/%c/cmd",
            f"pattern read {topic_root}/dev/%c/schedule",
            "# Area command topics (§1.12): any device may follow them, none may publish on them.",
            f"pattern read {topic_root}/area/+/cmd",
            "",
        ]
    )


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
        persistence: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port or free_tcp_port(host)
        self._accounts = accounts
        self._controller_username = controller_username
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

    def write_files(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        password_path = self.state_dir / "passwords"
        acl_path = self.state_dir / "acl"
        password_path.write_text("\n".join(mosquitto_password_line(a) for a in self._accounts) + "\n")
        acl_path.write_text(acl_text(self._controller_username))
        for path in (password_path, acl_path):
            path.chmod(0o600)
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
        """Re-read the password and ACL files without dropping connections (SIGHUP)."""
        if self._process is not None and self._process.poll() is None:
            self.write_files()
            self._process.send_signal(signal.SIGHUP)

    def set_accounts(self, accounts: list[BrokerAccount]) -> None:
        self._accounts = accounts
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
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
