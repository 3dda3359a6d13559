"""Apps that cannot be served, each for its own reason."""

import os

not_callable = 42


def make_app():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"made by a factory"})
    return app


def neither(a, b, c):
    return None


class Holder:
    """APP may name an attribute of an attribute: broken:Holder.app."""

    app = staticmethod(make_app())


if os.environ.get("BROKEN_IMPORT"):
    raise ValueError("the settings are wrong")
