"""The command line: clear one-line errors, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from conftest import CYDISPATCH
from cydispatch import __version__


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CYDISPATCH, *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words in lines[0], lines[0]


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cydispatch {__version__}"


def test_help_lists_every_option():
    result = run("serve", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--workers", "--mode", "--policy", "--no-pin",
                   "--backlog", "--max-conns", "--graceful-timeout", "--log-level",
                   "--queue-depth", "--keepalive-timeout", "--timeout", "--max-requests",
                   "--max-requests-jitter", "APP", "--app-dir", "--factory", "--interface",
                   "--lifespan", "--root-path", "--proxy-headers", "--no-proxy-headers",
                   "--forwarded-allow-ips", "--header-timeout", "--threads", "--access-log",
                   "--ws-max-size", "--admin", "--proxy-protocol", "--ssl-certfile", "--ssl-keyfile",
                   "--ssl-keyfile-password", "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-ciphers",
                   "dispatch", "reuseport", "shared", "least-conn", "round-robin"):
        assert option in result.stdout


def test_no_command_shows_help():
    result = run()
    assert result.returncode == 2
    assert "serve" in result.stderr


def test_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), "--workers", "1")
    assert result.returncode == 1
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
def test_port_in_use_in_baseline_modes(mode):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--mode", mode, "--port", str(port), "--workers", "1")
    assert_one_line_error(result, "address already in use")


def test_bad_host():
    result = run("serve", "--host", "no-such-host.invalid", "--workers", "1")
    assert result.returncode == 1
    assert_one_line_error(result, "cannot resolve host 'no-such-host.invalid'")


def test_host_that_is_not_ours():
    result = run("serve", "--host", "192.0.2.1", "--port", "0", "--workers", "1")
    assert_one_line_error(result, "no such local address")


@pytest.mark.parametrize("args, words", [
    (["--workers", "0"], "argument --workers: must be at least 1, not 0"),
    (["--workers", "many"], "argument --workers: 'many' is not a whole number"),
    (["--port", "70000"], "argument --port: must be between 0 and 65535"),
    (["--mode", "magic"], "argument --mode: invalid choice: 'magic'"),
    (["--policy", "random"], "argument --policy: invalid choice: 'random'"),
    (["--graceful-timeout", "-1"], "must not be negative"),
    (["--max-conns", "0"], "must be at least 1"),
    # Past what the kernel or the primary's 32-bit counters take: no traceback.
    (["--max-conns", "5000000000"], "argument --max-conns: must be at most 2,147,483,647"),
    (["--backlog", "3000000000"], "argument --backlog: must be at most 2,147,483,647"),
    (["--queue-depth", "5000000000"], "argument --queue-depth: must be at most 4,096"),
    (["--queue-depth", "0"], "argument --queue-depth: must be at least 1, not 0, or auto"),
    (["--timeout", "1"], "argument --timeout: must be 0 (off) or at least 2 seconds"),
    (["--timeout", "soon"], "argument --timeout: 'soon' is not a number of seconds"),
    (["--max-requests", "-5"], "argument --max-requests: must not be negative, not -5"),
    (["--max-requests-jitter", "x"], "'x' is not a whole number"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments(args, words):
    result = run("serve", *args)
    assert result.returncode == 2
    assert_one_line_error(result, words)


def test_bad_environment_variable():
    result = run("serve", env={"CYDISPATCH_WORKERS": "0"})
    assert result.returncode == 2
    assert_one_line_error(result, "CYDISPATCH_WORKERS: must be at least 1, not 0")
    result = run("serve", env={"CYDISPATCH_MODE": "magic"})
    assert_one_line_error(result,
                          "CYDISPATCH_MODE: must be one of dispatch, reuseport, shared, not 'magic'")
    result = run("serve", env={"CYDISPATCH_APP": "nocolon"})
    assert_one_line_error(result, "CYDISPATCH_APP: 'nocolon' is not MODULE:ATTRIBUTE")
    result = run("serve", env={"CYDISPATCH_NO_PIN": "maybe"})
    assert_one_line_error(result, "CYDISPATCH_NO_PIN: 'maybe' is not one of")


def test_environment_variable_configures(start_server):
    server = start_server(workers=1, env={"CYDISPATCH_POLICY": "round-robin"})
    assert server.find(r"\(dispatch, round-robin, queue depth 2, 1 workers")


def test_queue_depth_auto_follows_the_workers_sharing_a_cpu(start_server):
    cpus = len(os.sched_getaffinity(0))
    server = start_server(workers=cpus + 1)
    # Some CPU has two workers: each gets twice the depth of a lone one, and
    # the lone one's while some request is slow.
    assert server.find(rf"queue depth 4 \(2 while some request is slow\), {cpus + 1} workers")
    server = start_server("--queue-depth", "5", workers=1)
    assert server.find(r"queue depth 5, 1 workers")
