"""One log format for the primary and its workers, on stderr."""

import logging
import sys

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"


# Loggers of libraries whose INFO lines carry no context of ours: heard only
# at --log-level debug.
QUIET_BELOW_DEBUG = ("cydispatch.websocket",)


def configure(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, format=FORMAT, level=level.upper(),
                        force=True)
    for name in QUIET_BELOW_DEBUG:
        logging.getLogger(name).setLevel(
            logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
