"""`cydispatch serve APP`: an APP that cannot be served is a clear error and a quick exit."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import APPS, CYDISPATCH
from http_client import get


def serve(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [CYDISPATCH, "serve", "--port", "0", "--workers", "2", "--app-dir", APPS, *args],
        capture_output=True, text=True, timeout=60, start_new_session=True,
        env={**os.environ, **(env or {})})
    return result, time.monotonic() - started


@pytest.mark.parametrize("app, words", [
    ("no_such_module:app", "cannot import 'no_such_module': no module named 'no_such_module'"),
    ("broken:missing", "'broken' has no attribute 'missing'"),
    ("broken:not_callable", "broken:not_callable is a int, not an ASGI or WSGI application"),
    ("broken:neither", "is neither an ASGI 3 application"),
    ("broken:make_app", "if it returns the application, add --factory"),
])
def test_an_app_that_cannot_be_loaded_stops_the_server(app, words):
    result, elapsed = serve(app)
    assert result.returncode == 4, result.stderr
    assert words in result.stderr
    assert "The application cannot be loaded; stopping" in result.stderr
    assert "Traceback" not in result.stderr     # not the user's code: no traceback
    assert "Starting a new worker" not in result.stderr
    assert elapsed < 20


def test_an_exception_while_importing_shows_the_users_traceback():
    result, _ = serve("broken:not_callable", env={"BROKEN_IMPORT": "1"})
    assert result.returncode == 4
    assert "importing 'broken' failed: ValueError: the settings are wrong" in result.stderr
    assert "Traceback" in result.stderr and 'broken.py", line' in result.stderr


def test_a_malformed_app_is_a_usage_error():
    result, _ = serve("just-a-name")
    assert result.returncode == 2
    assert "is not MODULE:ATTRIBUTE" in result.stderr


def test_factory(start_server):
    server = start_server("--app-dir", APPS, "--factory", "broken:make_app", workers=1)
    response = get(server.host, server.port, "/")
    assert response.body == b"made by a factory"


def test_a_dotted_attribute(start_server):
    server = start_server("--app-dir", APPS, "broken:Holder.app", workers=1)
    assert get(server.host, server.port, "/").body == b"made by a factory"


def test_interface_asgi_refuses_a_wsgi_app():
    result, _ = serve("--interface", "asgi", "flask_app:app")
    assert result.returncode == 4
    assert "is not an ASGI 3 application" in result.stderr


def test_app_from_the_environment(start_server):
    server = start_server(workers=1, env={"CYDISPATCH_APP": "edge_asgi:app",
                                          "CYDISPATCH_APP_DIR": APPS})
    assert get(server.host, server.port, "/from-env").body == b"/from-env"


def test_the_quick_starts_app_serves_on_every_worker(start_server):
    # The app the README's first command serves, run as it says: from the
    # clone's root (here given as --app-dir, the current directory there).
    import json
    import re
    from observe import distinct_workers_answer
    root = Path(__file__).parents[1]
    command = re.search(r"^pip install \. && cydispatch serve (\S+)$",
                        (root / "README.md").read_text(), re.MULTILINE)
    assert command, "the README's quick start no longer serves an app"
    server = start_server("--app-dir", str(root), command.group(1))
    pids = distinct_workers_answer(server, 2)
    item = get(server.host, server.port, "/items/7")
    assert item.status == 200
    body = json.loads(item.body)
    # Lifespan startup ran in the worker and its state reached the request.
    assert body["id"] == 7 and body["worker"] in pids and body["worker_up_seconds"] >= 0
    assert get(server.host, server.port, "/nope").status == 404
