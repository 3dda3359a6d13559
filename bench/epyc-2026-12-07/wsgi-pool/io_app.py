"""A WSGI app that waits as for a database: 5 ms on /, N ms on /slow?ms=N."""
import time


def app(environ, start_response):
    wait = 0.005
    if environ["PATH_INFO"] == "/slow":
        wait = int(environ["QUERY_STRING"].partition("=")[2]) / 1000
    time.sleep(wait)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]
