"""Durable state of the Batch API: uploaded files, batches, and one row per batch line.

SQLite (one file, WAL journal): every change is committed before the gateway acts on it, so a
gateway killed at any point restarts with what it had promised. Each line row holds the encoded
protocol request, its state (`pending` -> `submitted` -> `done`) and, once done, its output line.
A batch row holds its OpenAI batch object and the `<prefix>.events` offsets from which its
outcomes are read (batches.py explains why that is enough to lose nothing).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, status TEXT NOT NULL, priority TEXT NOT NULL, kind TEXT NOT NULL,
  offsets TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lines (
  batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL,
  request_id TEXT NOT NULL, model TEXT NOT NULL, payload BLOB, state TEXT NOT NULL,
  ok INTEGER, result TEXT, PRIMARY KEY (batch_id, idx));
CREATE INDEX IF NOT EXISTS lines_by_request ON lines (request_id);
"""

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


class BatchStore:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the event loop and from worker threads, one at a time.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a killed process loses nothing in WAL
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- files
    def add_file(self, purpose: str, filename: str, content: bytes,
                 file_id: str | None = None) -> dict[str, Any]:
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        created = int(time.time())
        self._tx([("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                   (file_id, purpose, filename, len(content), created, content))])
        return self.file(file_id) or {}

    def file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT id, purpose, filename, bytes, created_at FROM files "
                          "WHERE id = ?", file_id)
        if not rows:
            return None
        fid, purpose, filename, size, created = rows[0]
        return {"id": fid, "object": "file", "bytes": size, "created_at": created,
                "filename": filename, "purpose": purpose, "status": "processed"}

    def file_content(self, file_id: str) -> bytes | None:
        rows = self._rows("SELECT content FROM files WHERE id = ?", file_id)
        return bytes(rows[0][0]) if rows else None

    # -- batches
    def create_batch(self, body: dict[str, Any], priority: str, kind: str,
                     offsets: dict[int, int], lines: list[tuple[Any, ...]]) -> None:
        """`lines`: (idx, custom_id, request_id, model, payload or None, state, ok, result)."""
        self._tx([("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                   (body["id"], body["status"], priority, kind, json.dumps(offsets),
                    json.dumps(body))),
                  *(("INSERT INTO lines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (body["id"], *line)) for line in lines)])

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT body FROM batches WHERE id = ?", batch_id)
        if not rows:
            return None
        body: dict[str, Any] = json.loads(rows[0][0])
        total, completed, failed = self.counts(batch_id)
        body["request_counts"] = {"total": total, "completed": completed, "failed": failed}
        return body

    def batches(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._rows("SELECT id FROM batches ORDER BY rowid DESC LIMIT ?", limit)
        return [b for (bid,) in rows if (b := self.batch(bid)) is not None]

    def update_batch(self, body: dict[str, Any], *extra: tuple[str, tuple[Any, ...]]) -> None:
        body = {k: v for k, v in body.items() if k != "request_counts"}
        self._tx([("UPDATE batches SET status = ?, body = ? WHERE id = ?",
                   (body["status"], json.dumps(body), body["id"])), *extra])

    def active(self) -> list[tuple[str, str, str, dict[int, int]]]:
        """(id, status, priority, offsets) of every batch not finished yet."""
        rows = self._rows("SELECT id, status, priority, offsets FROM batches WHERE status IN "
                          f"({', '.join('?' * len(ACTIVE))})", *ACTIVE)
        return [(bid, status, prio, {int(k): v for k, v in json.loads(offs).items()})
                for bid, status, prio, offs in rows]

    def kind(self, batch_id: str) -> str:
        return str(self._rows("SELECT kind FROM batches WHERE id = ?", batch_id)[0][0])

    # -- lines
    def open_lines(self, batch_id: str) -> list[tuple[str, str, str, str, bytes | None]]:
        """(request_id, custom_id, state, model, payload) of the lines without an outcome."""
        return [(rid, cid, state, model, payload) for rid, cid, state, model, payload in
                self._rows("SELECT request_id, custom_id, state, model, payload FROM lines "
                           "WHERE batch_id = ? AND state != 'done' ORDER BY idx", batch_id)]

    def mark_submitted(self, request_ids: list[str]) -> None:
        self._tx(("UPDATE lines SET state = 'submitted' WHERE request_id = ? AND state = "
                  "'pending'", (rid,)) for rid in request_ids)

    def record(self, results: list[tuple[str, bool, dict[str, Any]]]) -> None:
        """Outcomes (request_id, ok, output line); a line that is done already keeps its own."""
        self._tx(("UPDATE lines SET state = 'done', ok = ?, result = ? WHERE request_id = ? "
                  "AND state != 'done'", (int(ok), json.dumps(line), rid))
                 for rid, ok, line in results)

    def counts(self, batch_id: str) -> tuple[int, int, int]:
        """(total, completed, failed) lines of a batch."""
        ((total, completed, failed),) = self._rows(
            "SELECT count(*), coalesce(sum(state = 'done' AND ok = 1), 0), "
            "coalesce(sum(state = 'done' AND ok = 0), 0) FROM lines WHERE batch_id = ?",
            batch_id)
        return int(total), int(completed), int(failed)

    def results(self, batch_id: str, ok: bool) -> list[str]:
        return [r for (r,) in self._rows("SELECT result FROM lines WHERE batch_id = ? AND "
                                         "state = 'done' AND ok = ? ORDER BY idx",
                                         batch_id, int(ok))]
