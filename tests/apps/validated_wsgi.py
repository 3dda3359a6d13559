"""A WSGI app wrapped in wsgiref's validator: any PEP 3333 slip of the server is a 500."""

from wsgiref.validate import validator


def simple_app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    lines = [f"{key}={environ[key]}" for key in
             ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL")]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("\n".join(lines) + f"\nbody={body.decode()}").encode()]


app = validator(simple_app)
