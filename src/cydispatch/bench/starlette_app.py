"""The bench app's routes on Starlette (`cydispatch bench --app cydispatch.bench.starlette_app:app`)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cydispatch.bench.apps import burn


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"Hello from Worker {os.getpid()}")


async def slow(request: Request) -> PlainTextResponse:
    burn(request.url.query.encode())
    return PlainTextResponse(f"Hello from Worker {os.getpid()}")


app = Starlette(routes=[Route("/", index), Route("/slow", slow)])
