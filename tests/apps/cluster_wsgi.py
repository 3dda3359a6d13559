"""A plain WSGI app that broadcasts from its pool threads and shows what its worker received."""

from __future__ import annotations

import json
import os
import threading
from urllib.parse import parse_qs

from cydispatch import cluster

received: list[list] = []
broadcast_from: list[str] = []


@cluster.on_message
def remember(obj, sender_id):
    received.append([obj, sender_id])


def app(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    if environ["PATH_INFO"] == "/broadcast":
        broadcast_from.append(threading.current_thread().name)
        cluster.broadcast({"tag": query.get("tag")})
    body = json.dumps({"worker_id": cluster.worker_id, "pid": os.getpid(),
                       "received": received, "broadcast_from": broadcast_from}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
