"""Real peers for the trust-model tests (imported as `peers`): certificates made with openssl at test time,
a peer process running as another uid (``nobody``), a tmemd subprocess, a process's RSS.

Nothing here mocks the transport: certificates are real X.509 (EC P-256) signed by a throwaway CA, and
the foreign-uid peer is a real process whose uid the kernel reports through SO_PEERCRED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tmemcore import wire

NOBODY = 65534
START_TIMEOUT = 20.0
# A subprocess that must answer within this long has hung (the tests' own timeouts are longer).
PEER_TIMEOUT = 30.0


# ===================================================================== certificates


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1, and client certificates by common name."""

    directory: Path
    ca: str
    server_cert: str
    server_key: str

    def client(self, name: str) -> tuple[str, str]:
        """(cert, key) of the client certificate with CN=name (made by ``make_pki``)."""
        return str(self.directory / f"{name}.pem"), str(self.directory / f"{name}.key")


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def _key_and_request(name: str, subject: str, cwd: Path) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd)


def _sign(name: str, ca: str, cwd: Path, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=cwd)


def _ca(name: str, subject: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", subject, "-days", "2", cwd=cwd)


def make_pki(directory: Path, clients: Sequence[str] = ("guest-a", "guest-b", "ops")) -> Pki:
    """CA ``ca`` signs the server (CN=tmemd, IP 127.0.0.1) and each client (O=tmem,CN=name); a second CA
    ``rogue-ca`` signs ``rogue-ops`` (also O=tmem,CN=ops: the right subject from the wrong CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing (Debian package openssl; make deps installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", "/CN=tmem test CA", directory)
    _key_and_request("server", "/CN=tmemd", directory)
    _sign("server", "ca", directory, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    for name in clients:
        _key_and_request(name, f"/O=tmem/CN={name}", directory)
        _sign(name, "ca", directory, "extendedKeyUsage=clientAuth")
    _ca("rogue-ca", "/CN=rogue CA", directory)
    _key_and_request("rogue-ops", "/O=tmem/CN=ops", directory)
    _sign("rogue-ops", "rogue-ca", directory, "extendedKeyUsage=clientAuth")
    return Pki(directory, str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ===================================================================== a directory other uids can reach


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's tmp_path sits under a 0700 directory), for sockets
    a foreign-uid peer must reach."""
    path = Path(tempfile.mkdtemp(prefix="tmem-trust-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs a peer as another uid (nobody) to show SO_PEERCRED decides")


# ===================================================================== a peer running as another uid

PEER_SCRIPT = r"""
import json, os, socket, sys
from tmemcore import wire

# Started as root (the interpreter may live where other uids cannot read), the peer drops to the
# target uid before it connects: SO_PEERCRED reports the credentials in effect at connect(2).
uid = int(sys.argv[3])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
assert os.getuid() == os.geteuid() == uid and os.getgid() == uid
address = wire.parse_address(sys.argv[1])
plan = json.loads(sys.argv[2])
held = []
results = []


def hello(client_id):
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(address.sockaddr)
    except OSError as exc:
        sock.close()
        return {"error": type(exc).__name__}
    wire.send_frame(sock, wire.encode_hello(client_id))
    try:
        status, assigned = wire.decode_welcome(wire.recv_frame(sock) or b"")
    except OSError as exc:
        return {"error": type(exc).__name__}
    if status == 0:
        held.append(sock)
        return {"status": 0, "assigned": assigned, "conn": len(held) - 1}
    sock.close()
    return {"status": status}


for step in plan:
    if step["do"] == "hello":
        results.append(hello(step["id"]))
    elif step["do"] == "silent":  # connect and say nothing
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        sock.connect(address.sockaddr)
        held.append(sock)
        results.append({"silent": len(held) - 1})
    elif step["do"] == "op":
        sock = held[step["conn"]]
        page = None if step.get("page") is None else bytearray.fromhex(step["page"])
        wire.send_frame(sock, wire.encode_request(bytes.fromhex(step["record"]), page))
        rc, buffer = wire.decode_response(wire.recv_frame(sock) or b"")
        results.append({"rc": rc, "buffer": None if buffer is None else buffer.hex()})
print(json.dumps(results), flush=True)
sys.stdin.read()  # hold the connections until the test closes our stdin
"""


class ForeignPeer:
    """A process running ``plan`` against ``address`` as uid/gid ``uid`` (no supplementary groups), keeping its connections open
    until ``close()``. ``results`` holds one dict per step: a hello's ``status`` (and ``assigned``, ``conn``)
    or ``error``; an op's ``rc`` and ``buffer`` (hex)."""

    def __init__(self, address: str, plan: list[dict[str, Any]], uid: int = NOBODY) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, address, json.dumps(plan), str(uid)],
            cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the peer prints once its plan has run (or dies)
        if not line:
            self.close()
            raise AssertionError(f"the foreign peer failed: {self.process.stderr.read() if self.process.stderr else ''}")
        self.results: list[dict[str, Any]] = json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=PEER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> "ForeignPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hello_step(client_id: int) -> dict[str, Any]:
    return {"do": "hello", "id": client_id}


def silent_step() -> dict[str, Any]:
    return {"do": "silent"}


def op_step(conn: int, record: bytes, page: bytes | bytearray | None = None) -> dict[str, Any]:
    return {"do": "op", "conn": conn, "record": record.hex(), "page": None if page is None else bytes(page).hex()}


# ===================================================================== tmemd as a subprocess


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    address: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def wait_log(self, text: str, timeout: float = 10.0) -> bool:
        """Whether ``text`` shows up in the daemon's log within ``timeout`` seconds (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            time.sleep(0.02)
        return text in self.log_text()


def start_tmemd(workdir: Path, listen: str, *args: str, memory: str = "4M") -> Daemon:
    """A tmemd subprocess, waited for through its --ready-file (a deadline, no fixed sleep)."""
    ready = workdir / "ready"
    log = workdir / "tmemd.log"
    ready.unlink(missing_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tmemcore.server", "--listen", listen, "--memory", memory,
             "--ready-file", str(ready), *args],
            stdout=subprocess.PIPE, stderr=log_file, text=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not (ready.exists() and ready.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            pytest.fail(f"tmemd did not start: {log.read_text()}")
        time.sleep(0.02)
    return Daemon(process, ready.read_text().strip(), log)


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def raw_hello(address: str, client_id: int, timeout: float = 5.0) -> tuple[int, int | None]:
    """(status, assigned) of one hello over a fresh plain connection, which is then closed."""
    parsed = wire.parse_address(address)
    import socket

    with socket.socket(parsed.family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(parsed.sockaddr)
        wire.send_frame(sock, wire.encode_hello(client_id))
        return wire.decode_welcome(wire.recv_frame(sock) or b"")
