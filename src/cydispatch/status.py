"""`cydispatch status`: a running server's workers on one screen, like `pm2 ls`."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

from cydispatch.listener import format_address, parse_admin_address

TIMEOUT_SECONDS = 5


class Unreachable(Exception):
    """The admin endpoint did not answer; the message is for the user."""


def fetch(admin: str) -> dict:
    host, port = parse_admin_address(admin)
    url = f"http://{format_address(host, port)}/status"
    not_ours = f"is this a cydispatch admin endpoint? (started with --admin {admin})"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            view = json.load(response)
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url} answered {exc.code}: {not_ours}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach {url}: {getattr(reason, 'strerror', None) or reason}"
                          " (is the server running with --admin?)") from None
    except http.client.HTTPException as exc:
        # Something else listens there (an SSH banner, a cut-off answer).
        raise Unreachable(f"{url} did not answer HTTP ({type(exc).__name__}): "
                          f"{not_ours}") from None
    except ValueError:
        raise Unreachable(f"{url} did not answer JSON: {not_ours}") from None
    if not (isinstance(view, dict) and isinstance(view.get("primary"), dict)
            and isinstance(view.get("workers"), list)):
        # An app's own /status, reached on the app's port.
        raise Unreachable(f"{url} answered JSON, but not a server's status: {not_ours}")
    return view


def as_json(view: dict) -> str:
    return json.dumps(view, indent=2)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / (1 << 20):.1f} MB"


def table(view: dict) -> str:
    primary = view["primary"]
    how = primary["mode"] + (f", {primary['policy']}" if primary["policy"] else "")
    state = "stopping" if primary["stopping"] else \
        "reloading" if primary["reloading"] else "serving"
    lines = [f"primary {primary['pid']} ({how}) on {primary['address']}: {state}, "
             f"up {duration(primary['uptime_seconds'])}"]
    connections = view["connections"]
    if connections["accepted"] is not None:
        lines.append(f"connections accepted {connections['accepted']}, "
                     f"handed again {connections['redispatched']}, "
                     f"taken over by a sibling {connections.get('stolen', 0)}")
    depth = view.get("queue_depth")     # none in the baseline modes, or from an older primary
    if depth is not None:
        if depth["slow"] == depth["full"]:
            lines.append(f"queue depth {depth['now']}")
        else:
            spells = depth["slow_spells"]
            lines.append(f"queue depth now {depth['now']}: {depth['full']}, and {depth['slow']} "
                         f"while some request is slow ({depth['slow_seconds']:.1f} s in "
                         f"{spells} spell{'' if spells == 1 else 's'})")
    restarts = ", ".join(f"{reason} {count}" for reason, count in view["restarts"].items())
    lines.append(f"restarts: {restarts}")
    messages = view.get("messages")     # an older primary's view has none
    if messages is not None:
        lines.append(f"messages broadcast {messages['broadcast']}, "
                     f"dropped {messages['dropped']} (a worker's outbox was full)")
    rows = [("worker", "pid", "cpu", "state", "conns", "queued", "requests", "restarts", "rss",
             "up")]
    for worker in view["workers"]:
        rows.append((str(worker["worker"]), str(worker["pid"]),
                     "-" if worker["cpu"] is None else str(worker["cpu"]), worker["state"],
                     str(worker["connections"]), str(worker["queued"]),
                     str(worker["requests"]), str(worker["restarts"]), megabytes(worker["rss_bytes"]),
                     duration(worker["uptime_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in rows]
    return "\n".join(lines)
