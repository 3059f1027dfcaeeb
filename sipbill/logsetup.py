"""Structured logging: one line per event, ``ts=... level=... logger=... event=... key=value``.

Modules log ``log.info("event=name key=%s", value)``; this formatter adds the common fields and
renders the same record as JSON when ``server.log_format = "json"``. Secrets are never passed
to loggers in the first place (the settings dump redacts them).
"""

from __future__ import annotations

import json
import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if not msg.startswith("event="):
            msg = "event=message msg=" + json.dumps(msg)
        level = record.levelname.lower()
        line = f"ts={ts}.{int(record.msecs):03d}Z level={level} logger={record.name} {msg}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        for part in msg.split(" "):
            key, sep, value = part.partition("=")
            if sep:
                out[key] = value
            else:
                out.setdefault("msg", "")
                out["msg"] = f"{out['msg']} {part}".strip()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # chatty at info
