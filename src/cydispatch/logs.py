"""One log format for the primary and its workers, on stderr."""

import logging
import sys

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"


def configure(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, format=FORMAT, level=level.upper(),
                        force=True)
