"""A Flask app: JSON, uploads read as a stream, streamed responses, errors."""

from __future__ import annotations

import hashlib
import os

from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@app.get("/")
def index():
    return jsonify(hello="world", pid=os.getpid())


@app.get("/items/<int:item_id>")
def item(item_id: int):
    return jsonify(item_id=item_id, q=request.args.get("q"))


@app.post("/upload")
def upload():
    digest = hashlib.sha256()
    size = 0
    while chunk := request.stream.read(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(size=size, sha256=digest.hexdigest())


@app.post("/form")
def form():
    uploaded = request.files["file"]
    data = uploaded.read()
    return jsonify(name=uploaded.filename, size=len(data), field=request.form.get("field"))


@app.get("/stream")
def stream():
    chunks = int(request.args.get("chunks", 3))
    size = int(request.args.get("size", 10))

    @stream_with_context
    def generate():
        for i in range(chunks):
            yield str(i % 10) * size
    return Response(generate(), mimetype="text/plain")


@app.get("/environ")
def environ():
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
            "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "wsgi.url_scheme", "HTTP_HOST")
    return jsonify({key: request.environ.get(key) for key in keys} | {"url": request.url})


@app.get("/error")
def error():
    raise RuntimeError("the handler failed")
