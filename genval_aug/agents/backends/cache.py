"""On-disk response cache for chat backends (sqlite, JSON keys; no pickle, no secrets).

The key is a SHA-256 over the canonical JSON of (backend identity, model, messages, params), so
rebuilding a bank with the same prompts does not pay the model twice. Only the hash and the answer are
stored: neither the messages (they hold images) nor anything from the environment (API keys).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from genval_aug.agents.backends.base import Message, cache_identity

logger = logging.getLogger(__name__)


def default_cache_path() -> Path:
    """``$GENVAL_AUG_CACHE/responses.sqlite`` or ``~/.cache/genval-aug/responses.sqlite``."""
    root = os.environ.get("GENVAL_AUG_CACHE") or str(Path.home() / ".cache" / "genval-aug")
    return Path(root) / "responses.sqlite"


def cache_key(identity: dict[str, Any], messages: list[Message], params: dict[str, Any]) -> str:
    blob = json.dumps({"id": identity, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """A sqlite table ``key -> response``; thread-safe; ``enabled=False`` makes every call a miss."""

    def __init__(self, path: str | os.PathLike | None = None, enabled: bool = True):
        self.path = Path(path) if path is not None else default_cache_path()
        self.enabled = enabled
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, backend TEXT, "
                         "model TEXT, response TEXT NOT NULL, created REAL)")
            conn.commit()
            self._conn = conn
        return self._conn

    def _broken(self, e: BaseException) -> None:
        """A cache that cannot be read or written (corrupt file, full or read-only disk) is turned off with a
        warning: it must not fail the requests it only speeds up (a build marked every batch as failed)."""
        if self.enabled:
            logger.warning("response cache %s unusable (%s: %s); continuing without it", self.path,
                           type(e).__name__, e)
        self.enabled = False
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:  # pragma: no cover
                pass
            self._conn = None

    def get(self, key: str) -> str | None:
        if not self.enabled:
            return None
        with self._lock:
            try:
                row = self._db().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            except (sqlite3.Error, OSError) as e:
                self._broken(e)
                return None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row[0]

    def put(self, key: str, response: str, identity: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._lock:
            try:
                db = self._db()
                db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                           (key, str(identity.get("backend")), str(identity.get("model")), response, time.time()))
                db.commit()
            except (sqlite3.Error, OSError) as e:
                self._broken(e)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __getstate__(self):  # picklable for worker processes: the connection is reopened lazily
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CachedBackend:
    """Wraps a :class:`ChatBackend` with a :class:`ResponseCache`; same interface.

    Misses in a ``chat_batch`` go to the wrapped backend as one batch.
    """

    def __init__(self, backend: Any, cache: ResponseCache | str | os.PathLike | None = None):
        self.backend = backend
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)

    @property
    def model(self) -> str:
        return self.backend.model

    def cache_identity(self) -> dict[str, Any]:
        return cache_identity(self.backend)

    def chat(self, messages: list[Message], **params: Any) -> str:
        return self.chat_batch([messages], **params)[0]

    def chat_batch(self, batch: list[list[Message]], **params: Any) -> list[str]:
        ident = self.cache_identity()
        keys = [cache_key(ident, m, params) for m in batch]
        out: list[str | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            fresh = self.backend.chat_batch([batch[i] for i in todo], **params)
            for i, r in zip(todo, fresh, strict=True):
                out[i] = r
                # an empty reply (content null: filtered, or a reasoning model out of tokens) is asked again, not
                # replayed forever; so is one cut at max_tokens (replayed as plain text, the agents could no
                # longer say it was truncated)
                if isinstance(r, str) and r.strip() and getattr(r, "finish_reason", None) != "length":
                    self.cache.put(keys[i], r, ident)
        logger.debug("response cache: %d hits, %d misses", len(batch) - len(todo), len(todo))
        return [r for r in out if r is not None]
