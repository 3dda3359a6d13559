"""A minimal Django project, served as WSGI and as ASGI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from http_client import Connection

APPS = str(Path(__file__).parent / "apps")


@pytest.fixture(scope="module", params=["django_project.wsgi:application",
                                        "django_project.asgi:application"])
def django_server(request):
    from conftest import Server
    server = Server("--app-dir", APPS, request.param, workers=2)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def request(server, path: str, method: str = "GET", body: bytes = b""):
    with Connection(server.host, server.port) as conn:
        conn.request(path, method=method, body=body, headers={"Connection": "close"})
        return conn.response()


def test_django_view(django_server):
    response = request(django_server, "/?q=x")
    assert response.status == 200
    body = json.loads(response.body)
    assert body["hello"] == "django" and body["q"] == "x" and body["remote"] == "127.0.0.1"


def test_django_upload(django_server):
    data = os.urandom(3 * 1024 * 1024)
    body = json.loads(request(django_server, "/upload", method="POST", body=data).body)
    assert body == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_django_streaming_response(django_server):
    assert request(django_server, "/stream").body == b"part0;part1;part2;part3;"


def test_django_error_and_empty_responses(django_server):
    assert request(django_server, "/error").status == 500
    assert request(django_server, "/status").status == 204
    assert request(django_server, "/missing").status == 404
