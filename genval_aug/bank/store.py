"""The LMDB instance bank: a lazy, fork/spawn-safe reader and a single atomic writer.

Layout (one LMDB environment, a directory):

=================  =====================================================================
sub-database       content
=================  =====================================================================
``meta``           ``schema`` (version), ``uuid`` (set at creation; copies keep it), ``stats``
                   (counts per category/source, rejection reasons), ``prior/<category>`` (size
                   priors), ``status/<name>`` (free JSON)
``records``        id -> JSON metadata
``images``         id -> PNG / WebP-lossless bytes
``index``          ``<category>\\0<seq:u32>`` -> id   (O(1) random draw per category)
``rejected``       id -> JSON metadata of instances the validator rejected (audit, never sampled)
``rejected_images`` id -> image bytes of rejected instances
=================  =====================================================================

py-lmdb refuses to open one environment twice in a process and an environment inherited over
``fork`` is unusable, so every process keeps at most one handle per bank (``_Registry``) and read-only
and writable handles are closed just before the process forks (``os.register_at_fork``; the fork first waits
for reads and commits in other threads to finish, up to ``FORK_READ_WAIT`` s; a read still running then starts
again once through a fresh handle); they reopen lazily. Closing only in the child is no option: LMDB allows
an environment (its close included) only in the process that opened it ("not after fork()"), and py-lmdb's own
locks inherited over fork may be held by a parent thread that does not exist in the child. Resizing the map (a
writer's growth, or adopting another process's), replacing a read-only handle by a writable one and closing the
handle likewise wait for the process's other reads: LMDB allows a resize only without open transactions, and a
closed env fails them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from genval_aug.bank.record import (
    CODECS,
    DEFAULT_CODEC,
    Instance,
    build_meta,
    content_id,
    decode_rgba,
    dumps,
    encode_rgba,
    loads,
    normalize_rgba,
)
from genval_aug.errors import BadInstanceError, BadRecordError, BankError, ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAMES = ("meta", "records", "images", "index", "rejected", "rejected_images")
MAX_READERS = 1024
READER_MAP_SIZE = 1 << 40  # address space only; the file keeps its own size
WRITER_MAP_SIZE = 1 << 30
MAX_KEY_BYTES = 511  # LMDB's default key size limit
# category names end up in keys: index "<category>\0<seq:4>" and meta "prior/<category>"
MAX_CATEGORY_BYTES = MAX_KEY_BYTES - len(b"prior/")


def check_category(category: Any, what: str = "instance") -> str:
    """``category`` as a usable bank category name, else ``BadInstanceError`` naming it."""
    if not isinstance(category, str) or not category:
        raise BadInstanceError(f"{what}: category must be a non-empty string, got {category!r}")
    try:
        n = len(category.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise BadInstanceError(f"{what}: category {category!r} is not encodable as UTF-8 ({e})") from None
    if n > MAX_CATEGORY_BYTES:
        raise BadInstanceError(f"{what}: category name is {n} bytes in UTF-8, at most {MAX_CATEGORY_BYTES} "
                               f"fit in an LMDB key ({category[:40]!r}...)")
    return category


def check_category_id(category_id: Any, what: str = "instance") -> int | None:
    """``category_id`` as an int (None stays None), else ``BadInstanceError`` naming it."""
    if category_id is None:
        return None
    try:
        cid = int(category_id)
        ok = not isinstance(category_id, bool) and float(category_id) == cid
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise BadInstanceError(f"{what}: category_id must be an integer, got {category_id!r}")
    return cid


class NewerSchemaError(BankError):
    """The bank was written with a newer schema than this genval_aug reads."""


def parse_schema(raw: bytes | None, path: str) -> int:
    """The version in a bank's ``schema`` record (0 when missing); ``BadRecordError`` when unreadable."""
    if raw is None:
        return 0
    schema = loads(raw, what=f"{path} schema")
    version = schema.get("version") if isinstance(schema, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRecordError(f"{path}: schema record {bytes(raw)[:80]!r} has no integer 'version'")
    return version


def check_schema_version(version: int, path: str) -> None:
    """Raise :class:`NewerSchemaError` for a bank written by a newer genval_aug than this one."""
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(f"{path} has bank schema {version}, newer than this genval_aug supports "
                               f"({SCHEMA_VERSION}); upgrade genval_aug to read it")


def _index_key(category: str, seq: int) -> bytes:
    return category.encode("utf-8") + b"\x00" + int(seq).to_bytes(4, "big")


class _Handle:
    __slots__ = ("env", "dbs", "writable", "pid", "closed_by_fork")

    def __init__(self, env: lmdb.Environment, dbs: dict[str, Any], writable: bool):
        self.env, self.dbs, self.writable, self.pid = env, dbs, writable, os.getpid()
        self.closed_by_fork = False  # a fork closed it while a read may still have been running through it


class _Registry:
    """One LMDB handle per bank directory per process (py-lmdb's rule), shared by readers and writer."""

    def __init__(self) -> None:
        self._handles: dict[str, _Handle] = {}
        self._init_locks()

    def _init_locks(self) -> None:
        self._lock = threading.RLock()  # guards _handles
        self._idle = threading.Condition(threading.Lock())  # guards _readers / _forking / _resizing
        self._readers = 0
        self._forking = False
        self._resizing = False
        self._local = threading.local()  # .reads: read transactions open in this thread

    def _enter(self) -> None:
        with self._idle:
            while self._forking or self._resizing:
                self._idle.wait()
            self._readers += 1
        self._local.reads = getattr(self._local, "reads", 0) + 1

    def _leave(self) -> None:
        self._local.reads -= 1
        with self._idle:
            self._readers -= 1
            if not self._readers:
                self._idle.notify_all()

    @contextmanager
    def reading(self, path: str, lock: bool) -> Iterator[_Handle]:
        """A handle that no fork, resize or close changes while the caller reads through it."""
        self._enter()
        try:
            yield self.get(path, write=False, lock=lock)
        finally:
            self._leave()

    @contextmanager
    def writing(self, path: str, map_size: int) -> Iterator[_Handle]:
        """The writable handle, which no fork, resize or close changes while the caller commits through it."""
        while True:
            self.get(path, write=True, map_size=map_size)  # opening may need exclusive(): not registered yet
            self._enter()
            h = self._handles.get(path)
            if h is not None and h.writable and h.pid == os.getpid():
                break
            self._leave()  # a fork closed it in between: open it again
        try:
            yield h
        finally:
            self._leave()

    @contextmanager
    def exclusive(self, path: str, what: str) -> Iterator[None]:
        """Run a change of this process's handle (resize, close, replace) once no other thread has a read
        transaction open on it; new reads wait meanwhile. LMDB allows ``set_mapsize`` only while the process
        has no transaction open, and a closed environment fails every read still running through it."""
        if getattr(self._local, "reads", 0):
            raise BankError(f"bank {path}: cannot {what} from inside a read of the bank")
        with self._idle:
            while self._forking or self._resizing:
                self._idle.wait()
            self._resizing = True
            while self._readers:
                self._idle.wait()
        try:
            yield
        finally:
            with self._idle:
                self._resizing = False
                self._idle.notify_all()

    def get(self, path: str, *, write: bool, lock: bool = True, map_size: int = WRITER_MAP_SIZE) -> _Handle:
        h = self._handles.get(path)
        if h is not None and h.pid == os.getpid() and (h.writable or not write):
            return h
        if write:  # may replace a read-only handle other threads are reading through
            with self.exclusive(path, "open a writer"):
                return self._get(path, write=write, lock=lock, map_size=map_size)
        return self._get(path, write=write, lock=lock, map_size=map_size)

    def _get(self, path: str, *, write: bool, lock: bool, map_size: int) -> _Handle:
        with self._lock:
            h = self._handles.get(path)
            if h is not None and h.pid != os.getpid():
                self._handles.pop(path)  # inherited over fork: never touch it
                h = None
            if h is not None and (h.writable or not write):
                return h
            if h is not None:  # upgrade a read-only handle to a writable one
                h.env.close()
                self._handles.pop(path)
            h = self._open(path, write=write, lock=lock, map_size=map_size)
            self._handles[path] = h
            return h

    @staticmethod
    def _open(path: str, *, write: bool, lock: bool, map_size: int) -> _Handle:
        if not write and not os.path.isfile(os.path.join(path, "data.mdb")):
            raise BankError(f"no instance bank at {path} (missing {os.path.join(path, 'data.mdb')})")
        try:
            if write:
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError as e:
                    raise BankError(f"cannot create instance bank at {path}: {e.strerror or e}") from None
                env = lmdb.open(path, map_size=map_size, max_dbs=len(DB_NAMES) + 1,
                                max_readers=MAX_READERS, meminit=False)
            else:
                env = lmdb.open(path, readonly=True, lock=lock, readahead=False, map_size=READER_MAP_SIZE,
                                max_dbs=len(DB_NAMES) + 1, max_readers=MAX_READERS)
        except lmdb.Error as e:
            raise BankError(f"cannot open instance bank at {path}: {e}") from e
        try:
            if write:
                # create every sub-database and the schema record in ONE transaction, so a reader
                # never sees a half-initialized bank
                for attempt in range(2):
                    try:
                        with env.begin(write=True) as txn:
                            dbs = {n: env.open_db(n.encode(), txn=txn) for n in DB_NAMES}
                            if txn.get(b"schema", db=dbs["meta"]) is None:
                                txn.put(b"schema", dumps({"version": SCHEMA_VERSION}), db=dbs["meta"])
                                txn.put(b"stats", dumps(_empty_stats()), db=dbs["meta"])
                                txn.put(b"uuid", uuid.uuid4().hex.encode(), db=dbs["meta"])
                        break
                    except lmdb.MapResizedError:  # another writer grew the file since lmdb.open
                        if attempt:
                            raise
                        env.set_mapsize(0)  # this env is not registered yet: no other transaction uses it
            else:
                dbs = {n: env.open_db(n.encode(), create=False) for n in DB_NAMES}
                with env.begin() as txn:
                    raw = txn.get(b"schema", db=dbs["meta"])
                try:
                    version = parse_schema(raw, path)
                except BadRecordError:
                    version = 0  # verify reports it; readers go on as for a bank without a schema record
                try:
                    check_schema_version(version, path)
                except NewerSchemaError:
                    env.close()
                    raise
        except lmdb.NotFoundError as e:
            env.close()
            raise BankError(f"{path} is not a genval_aug instance bank, or its writer is still creating it "
                            f"(missing sub-database: {e})") from e
        return _Handle(env, dbs, write)

    def reopen_resized(self, path: str) -> None:
        """Adopt the map size another process grew the file to."""
        self.set_mapsize(path, 0)

    def set_mapsize(self, path: str, size: int) -> None:
        """``env.set_mapsize`` of this process's handle, once no other thread is reading through it."""
        with self.exclusive(path, "resize the LMDB map"):
            h = self._handles.get(path)
            if h is not None and h.pid == os.getpid():
                h.env.set_mapsize(size)
                # lmdb 2.2 no longer accepts the old database handles after a resize: look them up again, in a
                # read transaction (a writable env would otherwise take LMDB's writer lock for the lookup)
                with h.env.begin() as txn:
                    h.dbs = {n: h.env.open_db(n.encode(), txn=txn, create=False) for n in h.dbs}

    def close(self, path: str) -> None:
        if path not in self._handles:
            return
        with self.exclusive(path, "close the bank"), self._lock:
            h = self._handles.pop(path, None)
            if h is not None and h.pid == os.getpid():
                h.env.close()

    def before_fork(self) -> None:
        """Wait for reads and commits in other threads to finish (new ones wait), then close this process's
        handles, the writer's too: an env inherited over fork is unusable and would make the child's open of
        the same path fail. They reopen lazily (a writer's queued instances live in Python, not in the env).
        The handle lock is held across the fork so the child never inherits it mid-update."""
        with self._idle:
            self._forking = True
            deadline = time.monotonic() + FORK_READ_WAIT
            while self._readers or self._resizing:  # a resize/close of another thread finishes first
                left = deadline - time.monotonic()
                if left <= 0:  # a long read (or the forking thread's own): close anyway, reads retry once
                    log.warning("forking while %d bank read(s)/commit(s) are still running; reads start again "
                                "through a fresh handle", self._readers)
                    break
                self._idle.wait(left)
        self._lock.acquire()
        for path, h in list(self._handles.items()):
            if h.pid == os.getpid():
                h.closed_by_fork = True
                try:
                    h.env.close()
                finally:
                    self._handles.pop(path, None)

    def after_fork_in_parent(self) -> None:
        self._lock.release()
        with self._idle:
            self._forking = False
            self._idle.notify_all()

    def after_fork_in_child(self) -> None:
        # locks may have been held by parent threads that do not exist here; inherited handles are dropped
        # lazily by get() (pid check)
        self._init_locks()


FORK_READ_WAIT = 10.0  # seconds a fork waits for other threads' bank reads to finish
_REGISTRY = _Registry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_REGISTRY.before_fork, after_in_parent=_REGISTRY.after_fork_in_parent,
                        after_in_child=_REGISTRY.after_fork_in_child)


class InstanceBank:
    """Read access to a bank. Cheap to create and to pickle; opens LMDB lazily in each process.

    Safe in DataLoader workers started with fork or spawn: the handle is never shared across processes.
    Every access uses a fresh short read transaction, so newly committed instances are visible at once;
    category counts are cached and re-read by :meth:`refresh` (or every ``refresh_interval`` seconds).
    """

    def __init__(self, path: str | os.PathLike, *, lock: bool = True, refresh_interval: float | None = 30.0):
        self.path = str(Path(path).expanduser().resolve())
        self.lock = lock
        self.refresh_interval = refresh_interval
        self._stats: dict[str, Any] | None = None
        self._stats_time = 0.0
        self._bad: set[str] = set()

    # pickling: only configuration travels
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "lock": self.lock, "refresh_interval": self.refresh_interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], lock=state["lock"], refresh_interval=state["refresh_interval"])

    def __repr__(self) -> str:
        return f"InstanceBank({self.path!r})"

    # -- low level -------------------------------------------------------------------------
    def _handle(self) -> _Handle:
        return _REGISTRY.get(self.path, write=False, lock=self.lock)

    def _read(self, fn):
        """Run ``fn(txn, dbs)`` in a fresh read transaction; adopt a grown map once if needed, and start again
        once if a fork closed the handle under the read (it waits ``FORK_READ_WAIT`` s for reads, not longer)."""
        for attempt in range(2):
            with _REGISTRY.reading(self.path, self.lock) as h:
                txn = None
                try:
                    with h.env.begin(buffers=False) as txn:
                        return fn(txn, h.dbs)
                except lmdb.MapResizedError:
                    if attempt:
                        raise
                    resized = True
                except lmdb.Error:
                    if attempt or not h.closed_by_fork:
                        raise
                    resized = False  # the next reading() opens a fresh handle once the fork is done
                finally:
                    del txn  # freed inside the read: lmdb 1.x crashes if a close() runs into its dealloc
            if resized:
                _REGISTRY.reopen_resized(self.path)  # outside the read: it waits for this process's other reads
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close this process's handle (it reopens on the next access)."""
        _REGISTRY.close(self.path)

    # -- metadata --------------------------------------------------------------------------
    def stats(self, *, refresh: bool = False) -> dict[str, Any]:
        """Bank-level statistics: counts per category and source, rejections, schema."""
        now = time.monotonic()
        stale = self.refresh_interval is not None and now - self._stats_time > self.refresh_interval
        if refresh or self._stats is None or stale:
            raw = self._read(lambda txn, dbs: txn.get(b"stats", db=dbs["meta"]))
            self._stats = loads(raw, what=f"{self.path} stats") if raw else _empty_stats()
            self._stats_time = now
        return self._stats

    def refresh(self) -> None:
        """Re-read category counts so instances committed since are drawn too."""
        self.stats(refresh=True)

    def categories(self) -> dict[str, int]:
        """Category name -> number of instances."""
        return {k: v["count"] for k, v in self.stats()["categories"].items() if v["count"] > 0}

    def category_ids(self) -> dict[str, int]:
        """Category name -> bank category id (unique per category)."""
        return {k: v["id"] for k, v in self.stats()["categories"].items()}

    def count(self, category: str | None = None) -> int:
        """Instances of ``category`` (all instances when None), from the cached stats."""
        if category is None:
            return int(self.stats()["total"])
        c = self.stats()["categories"].get(category)
        return int(c["count"]) if c else 0

    def __len__(self) -> int:
        return self.count()

    def schema_version(self) -> int:
        """The bank's schema version (0 when the schema record is missing)."""
        return parse_schema(self._read(lambda txn, dbs: txn.get(b"schema", db=dbs["meta"])), self.path)

    def uuid(self) -> str | None:
        """The bank's identity, written when it was created (None for banks made before uuids existed)."""
        raw = self._read(lambda txn, dbs: txn.get(b"uuid", db=dbs["meta"]))
        return raw.decode() if raw else None

    def size_prior(self, category: str) -> dict[str, float] | None:
        """Size statistics of ``category`` for paste-time scales, or None."""
        raw = self._read(lambda txn, dbs: txn.get(b"prior/" + category.encode(), db=dbs["meta"]))
        return loads(raw) if raw else None

    def get_status(self, name: str) -> dict[str, Any] | None:
        """The JSON status stored by ``BankWriter.set_status(name, ...)``, or None."""
        raw = self._read(lambda txn, dbs: txn.get(b"status/" + name.encode(), db=dbs["meta"]))
        return loads(raw) if raw else None

    def statuses(self, prefix: str = "") -> dict[str, Any]:
        """All status entries whose name starts with ``prefix`` (name -> JSON)."""
        key = b"status/" + prefix.encode()

        def fn(txn, dbs):
            out = {}
            cur = txn.cursor(db=dbs["meta"])
            if cur.set_range(key):
                for k, v in cur:
                    if not k.startswith(key):
                        break
                    out[k[len(b"status/"):].decode()] = loads(v, what=f"status {k.decode()}")
            return out

        return self._read(fn)

    def scan_meta(self, tables: tuple[str, ...] = ("records",), *, contains: bytes | None = None,
                  bad: list[str] | None = None) -> list[dict[str, Any]]:
        """Metadata of every record in ``tables`` ("records", "rejected"), in one read transaction.

        ``contains`` is a cheap pre-filter on the raw JSON bytes (records without it are not parsed).
        A record whose metadata does not parse raises :class:`BadRecordError`, or with ``bad`` given is
        left out and its error message appended to ``bad``.
        """

        def fn(txn, dbs):
            out = []
            for table in tables:
                for k, v in txn.cursor(db=dbs[table]):
                    if contains is None or contains in v:
                        try:
                            out.append(loads(v, what=f"{table} {k.decode()}"))
                        except BadRecordError as e:
                            if bad is None:
                                raise
                            bad.append(str(e))
            return out

        return self._read(fn)

    def get_meta(self, record_id: str) -> dict[str, Any]:
        """Metadata of one record without decoding its image; ``KeyError`` if absent."""
        raw = self._read(lambda txn, dbs: txn.get(record_id.encode(), db=dbs["records"]))
        if raw is None:
            raise KeyError(f"no record {record_id!r} in {self.path}")
        return loads(raw, what=f"record {record_id}")

    def __contains__(self, record_id: str) -> bool:
        return self._read(lambda txn, dbs: txn.get(record_id.encode(), db=dbs["records"])) is not None

    # -- instances -------------------------------------------------------------------------
    def get(self, record_id: str) -> Instance:
        """Decode one instance; raise ``KeyError`` if absent, ``BadRecordError`` if corrupt."""

        def fn(txn, dbs):
            key = record_id.encode()
            return txn.get(key, db=dbs["records"]), txn.get(key, db=dbs["images"])

        meta_raw, img = self._read(fn)
        if meta_raw is None:
            raise KeyError(f"no record {record_id!r} in {self.path}")
        return self._decode(record_id, meta_raw, img)

    def get_raw(self, record_id: str) -> tuple[dict[str, Any], bytes]:
        """Metadata and encoded image bytes, without decoding (for merge/export)."""

        def fn(txn, dbs):
            key = record_id.encode()
            return txn.get(key, db=dbs["records"]), txn.get(key, db=dbs["images"])

        meta_raw, img = self._read(fn)
        if meta_raw is None or img is None:
            raise BadRecordError(f"record {record_id}: missing {'metadata' if meta_raw is None else 'image'}")
        return loads(meta_raw, what=f"record {record_id}"), img

    def _decode(self, record_id: str, meta_raw: bytes | None, img: bytes | None) -> Instance:
        meta = loads(meta_raw, what=f"record {record_id}") if meta_raw is not None else None
        if meta is None or img is None:
            raise BadRecordError(f"record {record_id}: missing {'metadata' if meta is None else 'image'}")
        try:
            category, category_id = meta["category"], int(meta["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise BadRecordError(f"record {record_id}: metadata field {e} missing or invalid") from None
        return Instance(record_id, category, category_id, decode_rgba(img, record_id=record_id), meta)

    def id_at(self, category: str, seq: int) -> str | None:
        """Id of the ``seq``-th instance of ``category`` (insertion order), or None."""
        raw = self._read(lambda txn, dbs: txn.get(_index_key(category, seq), db=dbs["index"]))
        return raw.decode() if raw is not None else None

    def random_id(self, category: str, rng: np.random.Generator) -> str:
        """Id of a uniformly drawn instance of ``category``; ``KeyError`` when it has none."""
        n = self.count(category)
        if n == 0:
            raise KeyError(f"bank {self.path} has no instances of category {category!r}")
        rid = self.id_at(category, int(rng.integers(n)))
        if rid is None:
            raise BadRecordError(f"index of category {category!r} in {self.path} is inconsistent")
        return rid

    def random_instance(self, category: str, rng: np.random.Generator) -> Instance:
        """Draw one instance of ``category`` uniformly, in O(1)."""
        return self.get(self.random_id(category, rng))

    def ids(self, category: str | None = None) -> Iterator[str]:
        """Record ids, of one category in insertion order, or all in key order."""
        if category is not None:
            for seq in range(self.count(category)):
                rid = self.id_at(category, seq)
                if rid is not None:
                    yield rid
            return

        def fn(txn, dbs):
            return [k.decode() for k in txn.cursor(db=dbs["records"]).iternext(keys=True, values=False)]

        yield from self._read(fn)

    def iter_meta(self, category: str | None = None) -> Iterator[dict[str, Any]]:
        """Metadata of every record (of ``category``), one read per record."""
        for rid in self.ids(category):
            yield self.get_meta(rid)

    def rejected(self) -> Iterator[tuple[dict[str, Any], bytes]]:
        """Audit table: (metadata, image bytes) of instances the validator rejected."""

        def fn(txn, dbs):
            out = []
            for k, v in txn.cursor(db=dbs["rejected"]):
                out.append((loads(v, what=f"rejected {k.decode()}"), txn.get(k, db=dbs["rejected_images"])))
            return out

        yield from self._read(fn)


def _empty_stats() -> dict[str, Any]:
    return {"total": 0, "categories": {}, "sources": {}, "rejected": 0, "rejections": {}}


class BankWriter:
    """The single writer of a bank. Use as a context manager.

    Adds are buffered and committed atomically every ``batch_size`` instances (and on ``flush``/exit):
    a crash loses at most the uncommitted batch and never leaves a partial record. The map grows
    automatically on ``MapFullError``. LMDB's lock serializes writers across processes; keep the
    writer in its own (spawned) process when training reads the bank.
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 64, codec: str = DEFAULT_CODEC,
                 map_size: int = WRITER_MAP_SIZE):
        self.path = str(Path(path).expanduser().resolve())
        self.batch_size = int(batch_size)
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; choose one of {CODECS}")
        self.codec = codec
        self._map_size = int(map_size)
        self._pending: list[tuple] = []  # (kind, ...) operations, each checked when queued
        self._pending_ids: set[str] = set()
        self.added = 0
        self.duplicates = 0
        self._handle()
        # a read that adopts a map another writer grew; the writable handle skipped the readers' schema check
        check_schema_version(InstanceBank(self.path).schema_version(), self.path)

    def _handle(self) -> _Handle:
        return _REGISTRY.get(self.path, write=True, map_size=self._map_size)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()  # queued records are complete; committing them is always safe

    def close(self) -> None:
        """Commit what is queued and release this process's handle (readers reopen lazily)."""
        self.flush()
        _REGISTRY.close(self.path)

    # -- adding ----------------------------------------------------------------------------
    def add(self, rgba: np.ndarray, *, category: str, category_id: int | None = None,
            source: dict[str, Any] | None = None, verdict: dict[str, Any] | None = None) -> str:
        """Queue one RGBA instance (HxWx4 uint8, RGB order). Returns its content id.

        ``category_id`` names a new category's id when that id is free; an existing category keeps its id and
        a taken id is replaced by the next free one (logged), so every bank category has its own id.
        """
        check_category(category)
        what = f"instance of {category!r}"
        category_id = check_category_id(category_id, what)
        rgba = normalize_rgba(rgba, what=what)
        rid = content_id(category, rgba)
        # everything that could fail is checked now: a bad add must not sit in the queue and make every
        # later commit (with the good instances queued beside it) fail
        meta = self._build_meta(what, rid, rgba, category, source, verdict)
        self._queue(rid, ("add", rid, rgba, category, category_id, meta))
        return rid

    def _build_meta(self, what: str, rid: str, rgba: np.ndarray, category: str, source: Any,
                    verdict: Any) -> dict[str, Any]:
        for name, value in (("source", source), ("verdict", verdict)):
            if value is not None and not isinstance(value, Mapping):
                raise BadInstanceError(f"{what}: {name} must be a mapping or None, got {type(value).__name__}")
        try:
            meta = build_meta(rid, rgba, category=category, category_id=-1, codec=self.codec,
                              source=source, verdict=verdict)
            dumps(meta)
        except (TypeError, ValueError) as e:
            raise BadInstanceError(f"{what}: source/verdict metadata is unusable ({e})") from None
        return meta

    def add_encoded(self, meta: dict[str, Any], image: bytes) -> str:
        """Copy a record from another bank as is (merge): same id, same bytes."""
        rid = meta.get("id") if isinstance(meta, dict) else None
        if not isinstance(rid, str) or not rid:
            raise BadRecordError(f"record metadata without a usable 'id' field: {str(meta)[:200]}")
        what = f"record {rid}"
        try:
            category = check_category(meta.get("category"), what)
            category_id = check_category_id(meta.get("category_id"), what)
            dumps(meta)
        except (TypeError, ValueError) as e:
            raise BadRecordError(f"{what}: {e}") from None
        if not isinstance(image, (bytes, bytearray, memoryview)) or not len(image):
            raise BadRecordError(f"{what}: image must be non-empty bytes")
        self._queue(rid, ("add_encoded", rid, dict(meta), category, category_id, bytes(image)))
        return rid

    def _queue(self, rid: str, payload: tuple) -> None:
        if rid in self._pending_ids:
            self.duplicates += 1
            return
        self._pending.append(payload)
        self._pending_ids.add(rid)
        self._maybe_flush()

    def add_rejected(self, rgba: np.ndarray, *, category: str, source: dict[str, Any] | None = None,
                     verdict: dict[str, Any] | None = None) -> str:
        """Keep a rejected instance for audit and prompt optimization; never sampled."""
        check_category(category, "rejected instance")
        what = f"rejected instance of {category!r}"
        rgba = normalize_rgba(rgba, what=what)
        rid = content_id(category, rgba)
        meta = self._build_meta(what, rid, rgba, category, source, verdict)
        self._pending.append(("reject", rid, rgba, meta))
        self._maybe_flush()
        return rid

    def record_rejections(self, reasons: dict[str, int]) -> None:
        """Add counts of instances rejected before reaching the bank (by reason) to the bank stats."""
        try:
            counts = {str(k): int(v) for k, v in dict(reasons).items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"rejection counts must map reasons to integers: {e}") from None
        self._pending.append(("reasons", counts))
        self._maybe_flush()

    def set_size_prior(self, category: str, prior: dict[str, float]) -> None:
        """Per-category size statistics used for scale priors at paste time."""
        check_category(category, "size prior")
        self._queue_meta(b"prior/" + category.encode(), prior)
        self._maybe_flush()

    def set_status(self, name: str, status: dict[str, Any], *, commit: bool = True) -> None:
        """Free-form JSON status (e.g. a top-up worker's progress), readable with ``InstanceBank.get_status``.

        Committed at once with everything queued before it; ``commit=False`` leaves it queued (so several
        statuses can share one transaction)."""
        self._queue_meta(b"status/" + name.encode(), status)
        if commit:
            self.flush()

    def _queue_meta(self, key: bytes, value: Any) -> None:
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"bank meta key {key[:40]!r}... is {len(key)} bytes, LMDB allows {MAX_KEY_BYTES}")
        self._pending.append(("meta", key, dumps(value)))  # serialized now: an error names the caller's value

    def _maybe_flush(self) -> None:
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Commit everything queued in one atomic transaction."""
        if not self._pending:
            return
        # encode outside the transaction: the writer lock is held only for the puts
        ops = []
        for op in self._pending:
            if op[0] == "add":
                _, rid, rgba, category, category_id, meta = op
                ops.append(("add", rid, category, category_id, meta, encode_rgba(rgba, self.codec)))
            elif op[0] == "add_encoded":
                _, rid, meta, category, category_id, image = op
                ops.append(("add", rid, category, category_id, meta, image))
            elif op[0] == "reject":
                _, rid, rgba, meta = op
                ops.append(("reject", rid, meta, encode_rgba(rgba, self.codec)))
            else:
                ops.append(op)
        while True:
            grow = None
            with _REGISTRY.writing(self.path, self._map_size) as h:
                try:
                    with h.env.begin(write=True) as txn:
                        added, duplicates = self._apply(txn, h.dbs, ops)
                except lmdb.MapFullError:
                    grow = h.env.info()["map_size"] * 2
                except lmdb.MapResizedError:  # another writer process grew the file past this process's map
                    grow = 0
            if grow is None:
                break
            # outside the commit: a resize waits until no transaction of this process is open
            if grow:
                log.info("bank %s: map full, growing to %d MiB", self.path, grow >> 20)
                _REGISTRY.set_mapsize(self.path, grow)
                self._map_size = grow
            else:
                _REGISTRY.reopen_resized(self.path)
                self._map_size = max(self._map_size, self._handle().env.info()["map_size"])
        self.added += added
        self.duplicates += duplicates
        self._pending.clear()
        self._pending_ids.clear()

    def _apply(self, txn, dbs, ops) -> tuple[int, int]:
        stats = loads(txn.get(b"stats", db=dbs["meta"]))
        cats = stats["categories"]
        added = duplicates = 0
        for op in ops:
            kind = op[0]
            if kind == "add":
                _, rid, category, cid, meta, image = op
                key = rid.encode()
                if txn.get(key, db=dbs["records"]) is not None:
                    duplicates += 1
                    continue
                c = cats.get(category)
                if c is None:
                    used = {v["id"] for v in cats.values()}
                    if cid is not None and int(cid) in used:  # another dataset's id space: never share an id
                        log.warning("bank %s: category id %s asked for %r is already used by another category; "
                                    "giving it %d", self.path, cid, category, max(used) + 1)
                        cid = None
                    if cid is None:
                        cid = max(used, default=-1) + 1
                    c = cats[category] = {"id": int(cid), "count": 0, "sources": {}}
                meta = dict(meta)
                meta["category_id"] = c["id"]
                meta["seq"] = c["count"]
                txn.put(key, dumps(meta), db=dbs["records"])
                txn.put(key, image, db=dbs["images"])
                txn.put(_index_key(category, c["count"]), key, db=dbs["index"])
                c["count"] += 1
                src = str((meta.get("source") or {}).get("kind", "unknown"))
                c["sources"][src] = c["sources"].get(src, 0) + 1
                stats["sources"][src] = stats["sources"].get(src, 0) + 1
                stats["total"] += 1
                added += 1
            elif kind == "reject":
                _, rid, meta, image = op
                key = rid.encode()
                if txn.get(key, db=dbs["rejected"]) is not None:
                    continue
                txn.put(key, dumps(meta), db=dbs["rejected"])
                txn.put(key, image, db=dbs["rejected_images"])
                stats["rejected"] += 1
            elif kind == "reasons":
                for reason, n in op[1].items():
                    stats["rejections"][reason] = stats["rejections"].get(reason, 0) + int(n)
            elif kind == "meta":
                txn.put(op[1], op[2], db=dbs["meta"])
        txn.put(b"stats", dumps(stats), db=dbs["meta"])
        return added, duplicates
