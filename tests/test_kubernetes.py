"""deploy/kubernetes.yaml against the real program.

There is no cluster here: the manifest is read as the API server would
(YAML), its container's command is run as the kubelet would, and its probes
are sent by hand.  What is checked is that the example fits the program it
runs: the flags exist, the ports and probes point where cydispatch listens,
and the grace period covers a stop.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import yaml

from conftest import free_port
from http_client import get

MANIFEST = Path(__file__).parent.parent / "deploy" / "kubernetes.yaml"


def manifest() -> tuple[dict, dict]:
    """(the Deployment, the Service)."""
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}
    assert set(documents) == {"Deployment", "Service"}
    return documents["Deployment"], documents["Service"]


def container() -> dict:
    [only] = manifest()[0]["spec"]["template"]["spec"]["containers"]
    return only


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_ports_probes_and_grace_period_fit_together():
    deployment, service = manifest()
    pod = deployment["spec"]["template"]
    app = container()
    command = app["command"]
    assert command[:2] == ["cydispatch", "serve"]
    ports = {port["name"]: port["containerPort"] for port in app["ports"]}
    assert option(command, "--port") == str(ports["http"])
    assert option(command, "--admin").rpartition(":")[2] == str(ports["admin"])
    # The probes go to the admin endpoint; the Service sends traffic to the
    # app only (the admin endpoint has no authentication).
    assert app["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert app["livenessProbe"]["httpGet"]["port"] == "admin"
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["admin"])
    # A stop: the preStop pause, then up to --graceful-timeout for requests in
    # progress; the kubelet's SIGKILL must come after both.
    pause = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = float(option(command, "--graceful-timeout"))
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + graceful
    # Whole CPUs, requests equal to limits: the pod may have them to itself,
    # and a worker is pinned to each.
    resources = app["resources"]
    assert resources["requests"] == resources["limits"]
    assert float(resources["limits"]["cpu"]).is_integer()


def test_the_command_serves_and_answers_its_probes(start_server):
    # The kubelet runs the container's command; here with the example's app
    # and loopback ports in place of the placeholders.
    app = container()
    args = app["command"][2:]
    args[0] = "examples.hello:app"
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = "0"
    admin = free_port()
    args[args.index("--admin") + 1] = f"127.0.0.1:{admin}"
    server = start_server(*args)
    assert get(server.host, server.port, "/items/7").status == 200
    for probe in ("readinessProbe", "livenessProbe"):
        path = app[probe]["httpGet"]["path"]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as answer:
            assert answer.status == 200, probe
