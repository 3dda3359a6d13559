"""TLS: HTTPS in every mode, client certificates, handshakes that fail or never
come, and settings that cannot serve; real processes, certificates made here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from cydispatch.settings import Settings
from http_client import Connection, Response, read_until_closed
from test_admin import admin_url
from test_cli import assert_one_line_error, run
from waiting import wait_until

APPS = str(Path(__file__).parent / "apps")
KEY_PASSWORD = "correct horse"
HEADER_TIMEOUT = 5.0
# How much later than its deadline a busy 2-CPU machine may close a connection.
LATE = 3.0



@dataclass
class Certs:
    ca: str
    server_cert: str
    server_key: str
    encrypted_key: str
    client_cert: str
    client_key: str
    missing: str
    renewed_cert: str
    renewed_key: str
    corrupt_cert: str


def openssl(directory: Path, *args: str) -> None:
    """The openssl command makes the test certificates (.ci/run installs it)."""
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                   timeout=60)


def issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    """name.key and name.pem, signed by the test CA."""
    (directory / f"{name}.ext").write_text(extensions)
    openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
            "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client's."""
    directory = tmp_path_factory.mktemp("tls")
    openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=cydispatch test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    leaf = ("basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n")
    issue(directory, "server", "/CN=localhost",
          leaf + "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    issue(directory, "client", "/CN=a client", leaf + "extendedKeyUsage=clientAuth\n")
    issue(directory, "renewed", "/CN=localhost",
          leaf + "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl(directory, "pkey", "-in", "server.key", "-aes256", "-passout",
            f"pass:{KEY_PASSWORD}", "-out", "server-encrypted.key")
    # PEM armour around something that is no certificate (a copy cut short).
    (directory / "corrupt.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHHIG\n-----END CERTIFICATE-----\n")
    path = lambda name: str(directory / name)  # noqa: E731
    return Certs(path("ca.pem"), path("server.pem"), path("server.key"),
                 path("server-encrypted.key"), path("client.pem"), path("client.key"),
                 path("missing.pem"), path("renewed.pem"), path("renewed.key"),
                 path("corrupt.pem"))


def serving(certs: Certs) -> tuple[str, ...]:
    return ("--ssl-certfile", certs.server_cert, "--ssl-keyfile", certs.server_key)


def client_context(certs: Certs, with_certificate: bool = False) -> ssl.SSLContext:
    """Checks the server against the test CA; offers h2 first, as browsers do."""
    context = ssl.create_default_context(cafile=certs.ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if with_certificate:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


def tls_get(server, context: ssl.SSLContext, path: str = "/") -> tuple[Response, str | None]:
    """(the response, the protocol the server chose by ALPN)."""
    with Connection(server.host, server.port, tls=context) as conn:
        conn.request(path, headers={"Connection": "close"})
        return conn.response(), conn.sock.selected_alpn_protocol()


def held_connections(server) -> tuple[int, int]:
    """(open, queued) connections the primary sees its workers hold."""
    with urllib.request.urlopen(admin_url(server) + "/status", timeout=10) as response:
        workers = json.load(response)["workers"]
    return (sum(w["connections"] for w in workers), sum(w["queued"] for w in workers))


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent until it closed, waiting up to `timeout` for each read."""
    sock.settimeout(timeout)
    return read_until_closed(sock)


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True     # nothing to read, and not closed
    except ConnectionResetError:
        return False


@pytest.mark.parametrize("mode", ["dispatch", "reuseport", "shared"])
def test_https_in_every_mode(start_server, certs, mode):
    server = start_server(*serving(certs), "--mode", mode)
    assert server.url.startswith("https://")
    served_by = set()
    for _ in range(4):
        response, protocol = tls_get(server, client_context(certs))
        assert response.status == 200
        assert protocol == "http/1.1"     # never h2: a worker speaks HTTP/1.1 only
        served_by.add(response.pid)
    assert served_by <= server.worker_pids()


@pytest.mark.parametrize("app", ["edge_asgi:app", "wsgi_edge:app"])
def test_the_app_sees_https(start_server, certs, app):
    server = start_server(*serving(certs), "--app-dir", APPS, app)
    response, _ = tls_get(server, client_context(certs), "/scheme")
    assert (response.status, response.body) == (200, b"https")


@pytest.mark.parametrize("app", ["edge_asgi:app", "wsgi_edge:app", ""])
def test_a_client_that_ends_tls_cleanly_gets_close_notify_back(start_server, certs, app):
    # The client's close_notify reaches the protocol as eof_received(); the
    # server ends its side the same way, with no error logged.
    server = start_server(*serving(certs), "--app-dir", APPS, *([app] if app else []))
    with Connection(server.host, server.port, tls=client_context(certs)) as conn:
        conn.request("/")
        assert conn.response().status in (200, 404)
        plain = conn.sock.unwrap()  # raises if the server aborts instead
        assert plain.recv(1) == b""
    response, _ = tls_get(server, client_context(certs))
    assert response.status in (200, 404)
    assert not server.find(r"ERROR|eof_received")


def test_a_required_client_certificate(start_server, certs):
    server = start_server(*serving(certs), "--ssl-ca-certs", certs.ca,
                          "--ssl-cert-reqs", "required", "--admin", "127.0.0.1:0")
    workers = server.worker_pids()
    with pytest.raises(OSError):    # an alert (ssl.SSLError), or the connection closed
        tls_get(server, client_context(certs))
    response, _ = tls_get(server, client_context(certs, with_certificate=True))
    assert response.status == 200
    # The refused handshake is no connection left counted anywhere.
    wait_until(lambda: held_connections(server) == (0, 0), message="no connection held")
    assert server.worker_pids() == workers


def test_an_optional_client_certificate_is_checked_when_sent(start_server, certs, tmp_path):
    server = start_server(*serving(certs), "--ssl-ca-certs", certs.ca,
                          "--ssl-cert-reqs", "optional")
    assert tls_get(server, client_context(certs))[0].status == 200
    assert tls_get(server, client_context(certs, with_certificate=True))[0].status == 200
    # A certificate no CA of --ssl-ca-certs signed is refused, not ignored.
    openssl(tmp_path, "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "stranger.key",
            "-out", "stranger.pem", "-days", "2", "-subj", "/CN=a stranger")
    stranger = client_context(certs)
    stranger.load_cert_chain(tmp_path / "stranger.pem", tmp_path / "stranger.key")
    with pytest.raises(OSError):
        tls_get(server, stranger)
    assert tls_get(server, client_context(certs))[0].status == 200


def test_ssl_ciphers_choose_the_tls12_cipher(start_server, certs):
    cipher = "ECDHE-ECDSA-AES128-GCM-SHA256"
    server = start_server(*serving(certs), "--ssl-ciphers", cipher)
    context = client_context(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2    # TLS 1.3 suites are not chosen so
    with Connection(server.host, server.port, tls=context) as conn:
        conn.request("/", headers={"Connection": "close"})
        assert conn.response().status == 200
        assert conn.sock.cipher()[0] == cipher


def test_a_client_that_never_says_hello_is_closed_after_the_header_timeout(start_server, certs):
    server = start_server(*serving(certs), "--header-timeout", str(HEADER_TIMEOUT),
                          "--queue-depth", "2", "--admin", "127.0.0.1:0", workers=1)
    (worker,) = server.worker_pids()
    context = client_context(certs)
    assert tls_get(server, context)[0].status == 200    # what a first request opens stays
    wait_until(lambda: held_connections(server) == (0, 0), message="no connection held")
    baseline = open_descriptors(worker)
    connected = time.monotonic()
    idle = [socket.create_connection((server.host, server.port)) for _ in range(2)]
    try:
        wait_until(lambda: open_descriptors(worker) == baseline + 2,
                   message="the worker to hold both idle connections")
        handed = time.monotonic()
        # The idle pair fills the worker's queue; handshakes that slow must
        # give up their place, as a slow request head does.
        response, _ = tls_get(server, context)
        assert response.status == 200
        assert all(still_open(sock) for sock in idle), \
            "served only once the idle connections were closed"
        for sock in idle:
            assert closed_by_server(sock, HEADER_TIMEOUT + LATE + 10) == b""
        closed = time.monotonic()
    finally:
        for sock in idle:
            sock.close()
    assert HEADER_TIMEOUT <= closed - connected
    assert closed - handed <= HEADER_TIMEOUT + LATE
    wait_until(lambda: open_descriptors(worker) == baseline,
               message=f"the worker's descriptors back to {baseline}")
    wait_until(lambda: held_connections(server) == (0, 0), message="no connection held")
    assert server.worker_pids() == {worker}
    assert tls_get(server, context)[0].status == 200


@pytest.mark.parametrize("app", [(), ("--app-dir", APPS, "edge_asgi:app")],
                         ids=["built-in", "asgi"])
def test_plain_http_on_the_tls_port_is_closed_and_the_worker_goes_on(start_server, certs, app):
    server = start_server(*serving(certs), "--admin", "127.0.0.1:0", *app, workers=1)
    (worker,) = server.worker_pids()
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = closed_by_server(sock, 30)
    assert b"HTTP/1.1" not in answer
    wait_until(lambda: held_connections(server) == (0, 0), message="no connection held")
    assert server.worker_pids() == {worker}
    assert tls_get(server, client_context(certs))[0].status == 200


def served_certificate(server, context: ssl.SSLContext) -> dict:
    with Connection(server.host, server.port, tls=context) as conn:
        return conn.sock.getpeercert()


def test_a_reload_serves_a_renewed_certificate_and_survives_a_broken_one(
        start_server, certs, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    server = start_server("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    context = client_context(certs)
    first = served_certificate(server, context)["serialNumber"]
    shutil.copy(certs.renewed_cert, cert)
    shutil.copy(certs.renewed_key, key)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log("Reload complete")
    renewed = served_certificate(server, context)["serialNumber"]
    assert renewed != first
    # A certificate broken on disk: the new workers cannot start, the old serve on.
    # The replaced workers may still be finishing: wait for the new pair alone.
    serving_workers = wait_until(lambda: len(pids := server.worker_pids()) == 2 and pids,
                                 message="the replaced workers to exit")
    cert.write_text("not a certificate\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log("replacing stops here, the running workers keep serving")
    assert server.find("cannot start: --ssl-certfile: .* holds no PEM certificate")
    assert serving_workers <= server.worker_pids()
    assert served_certificate(server, context)["serialNumber"] == renewed


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_encrypted_key_with_its_password_stays_off_worker_command_lines(
        start_server, certs, how):
    args = ("--ssl-certfile", certs.server_cert, "--ssl-keyfile", certs.encrypted_key)
    env = {}
    if how == "flag":
        args += ("--ssl-keyfile-password", KEY_PASSWORD)
    else:
        env = {"CYDISPATCH_SSL_KEYFILE_PASSWORD": KEY_PASSWORD}
    server = start_server(*args, env=env)
    assert tls_get(server, client_context(certs))[0].status == 200
    for pid in server.worker_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert KEY_PASSWORD.encode() not in cmdline.read()
    # Nor in the settings' repr, which a log line or a traceback may show.
    assert KEY_PASSWORD not in repr(Settings(ssl_keyfile_password=KEY_PASSWORD))


CANNOT_SERVE = {
    "missing certificate": (lambda c: ["--ssl-certfile", c.missing],
                            "--ssl-certfile: cannot read"),
    "missing key": (lambda c: ["--ssl-certfile", c.server_cert, "--ssl-keyfile", c.missing],
                    "--ssl-keyfile: cannot read"),
    "wrong password": (lambda c: ["--ssl-certfile", c.server_cert, "--ssl-keyfile",
                                  c.encrypted_key, "--ssl-keyfile-password", "wrong"],
                       "--ssl-keyfile-password does not decrypt the key"),
    "no password": (lambda c: ["--ssl-certfile", c.server_cert,
                               "--ssl-keyfile", c.encrypted_key],
                    "is encrypted: give --ssl-keyfile-password"),
    "another's key": (lambda c: ["--ssl-certfile", c.server_cert,
                                 "--ssl-keyfile", c.client_key],
                      "does not match the certificate"),
    "a key for a certificate": (lambda c: ["--ssl-certfile", c.server_key],
                                "holds no PEM certificate"),
    # Once blamed on the key: "--ssl-keyfile: no private key in server.key".
    "a corrupt certificate": (lambda c: ["--ssl-certfile", c.corrupt_cert,
                                         "--ssl-keyfile", c.server_key],
                              "--ssl-certfile: cannot load the certificate in"),
    "required without CAs": (lambda c: ["--ssl-certfile", c.server_cert, "--ssl-keyfile",
                                        c.server_key, "--ssl-cert-reqs", "required"],
                             "--ssl-cert-reqs required needs --ssl-ca-certs"),
    "key without certificate": (lambda c: ["--ssl-keyfile", c.server_key],
                                "--ssl-keyfile needs --ssl-certfile"),
    "no such cipher": (lambda c: ["--ssl-certfile", c.server_cert, "--ssl-keyfile",
                                  c.server_key, "--ssl-ciphers", "NOT-A-CIPHER"],
                       "--ssl-ciphers: 'NOT-A-CIPHER' selects no cipher"),
    "PROXY protocol in a baseline mode": (
        lambda c: ["--ssl-certfile", c.server_cert, "--ssl-keyfile", c.server_key,
                   "--proxy-protocol", "--mode", "reuseport"],
        "--proxy-protocol with TLS is served in --mode dispatch, not reuseport"),
}


@pytest.mark.parametrize("case", CANNOT_SERVE)
def test_tls_settings_that_cannot_serve_are_one_line_at_startup(certs, case):
    args, words = CANNOT_SERVE[case]
    started = time.monotonic()
    result = run("serve", "--port", "0", "--workers", "1", *args(certs))
    assert result.returncode == 2
    assert_one_line_error(result, words)
    # Refused by the primary, not by workers dying one after another.
    assert time.monotonic() - started < 10
