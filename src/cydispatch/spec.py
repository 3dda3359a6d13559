"""What the primary tells a worker it starts, as JSON on its command line.

A module of its own so that the primary, which only writes a spec, does not
import what a worker serves with (uvloop, httptools, the app).
"""

from __future__ import annotations

import dataclasses
import json
import os

from cydispatch.settings import Settings

# Exit code of a worker that could not start, and of the primary when no
# worker can (as gunicorn's).
WORKER_BOOT_ERROR = 3
# Exit code of a worker that cannot load the application (APP), and of the
# primary when that happens before any worker served: it stops at once
# instead of starting worker after worker that would fail the same way.
APP_LOAD_ERROR = 4
# The TLS key's password reaches a worker in its environment, which only its
# user can read, not on its command line, which `ps` shows everyone.
KEY_PASSWORD_ENV = "CYDISPATCH_SSL_KEYFILE_PASSWORD"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    settings: Settings
    slot: int
    cpu: int | None         # the CPU to pin to; None with --no-pin
    channel_fd: int
    load_fd: int
    listen_fd: int = -1     # shared mode only
    messages_fd: int = -1   # the worker's end of its message socket (cluster)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["settings"] = dataclasses.asdict(self.settings.replace(ssl_keyfile_password=""))
        return json.dumps(fields)

    def environment(self, inherited: dict[str, str]) -> dict[str, str]:
        """The worker's environment: `inherited`, and what must not be in to_json."""
        if not self.settings.ssl_keyfile_password:
            return inherited
        return {**inherited, KEY_PASSWORD_ENV: self.settings.ssl_keyfile_password}

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        fields = json.loads(text)
        # Out of the environment too: the app, and what it starts, need not see it.
        fields["settings"]["ssl_keyfile_password"] = os.environ.pop(KEY_PASSWORD_ENV, "")
        fields["settings"] = Settings(**fields["settings"])
        return cls(**fields)
