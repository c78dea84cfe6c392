"""The edge's log output: plain text for people, or one JSON object per line for collectors.

Why JSON lines: a board's logs usually go to journald, a container runtime or a log shipper;
one object per line with fixed keys (``time``, ``level``, ``logger``, ``message``, plus
``error`` with the traceback when there is one) is parsed without regular expressions.
"""

from __future__ import annotations

import json
import logging
import time

LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; times in UTC, ISO 8601 with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr in ``fmt`` at ``level``: the root logger's plain stream handlers (the one
    ``logging.basicConfig`` made) get the formatter, or one is added; other handlers (a test
    harness's, a file) are left alone."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level must be one of {LEVELS} and format one of {FORMATS}, got {level!r}, {fmt!r}")
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not plain:
        plain = [logging.StreamHandler()]
        root.addHandler(plain[0])
    for handler in plain:
        handler.setFormatter(formatter)
    root.setLevel(getattr(logging, level.upper()))
