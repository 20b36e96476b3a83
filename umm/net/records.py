"""DHT records of a umm network: keys, schemas, validators, announce/read and periodic refresh.

Keys (``<network>`` is the network's name)::

    umm.<network>.experts                 subkey: contributor's owner marker  -> ExpertRecord
    umm.<network>.scores                  subkey: coordinator's owner marker  -> ScoresIndex
    umm.<network>.scores.<page>           subkey: coordinator's owner marker  -> ScoresPage (page < 128)
    umm.<network>.merged                  subkey: coordinator's owner marker  -> MergedRecord
    umm.<network>.providers.<hash>        subkey: provider's owner marker     -> ProviderRecord

An *owner marker* is ``b"[owner:" + OpenSSH public key + b"]"``: hivemind's
:class:`~hivemind.dht.crypto.RSASignatureValidator` then requires every write under that subkey
to carry the owner's signature (over key, subkey, value and expiration), so a peer can write only
its own entries. hivemind's :class:`~hivemind.dht.schema.SchemaValidator` rejects values of the
wrong shape for the fixed keys (experts, scores index and pages, merged; strict pydantic v1
types, no extra fields, our ``schema_version``). Provider keys contain a hash, so no fixed schema can name them: they are
protected by signature like the others and their shape is checked on read.

Scores and merged-model records are trusted only under the coordinator's marker. Readers ignore
every other subkey, and a DHT started with ``coordinator_public_key`` (see
:func:`make_validators`) refuses to store or relay them at all. Give every peer of a network the
coordinator key: hivemind drops a whole dictionary answer when one entry of it fails validation.

The coordinator's scores (a :class:`ScoresRecord`, one verdict per expert) are stored as pages of
at most :data:`PAGE_BYTES` each plus an index naming the round, time and page count
(:func:`scores_pages`); :meth:`NetworkRecords.scores` reads them back as one record. No value we
store exceeds :data:`MAX_VALUE_BYTES` (:func:`store_value` refuses it). hivemind's own limit is
per DHT RPC: a request or answer over p2pd's 4 MiB message (``DEFAULT_MAX_MSG_SIZE``, hivemind
keeps unary payloads to half that) fails, and a dictionary key travels whole in one answer
(every subkey, with owner markers and signatures), so single values stay far below it. (Before
:mod:`umm.net.dht` read requests whole, any request over the 64 KiB pipe buffer between a DHT
and its owner could kill the DHT process; records of ~200 KB did.)

Every DHT call is bounded: :class:`DHTUnavailableError` after ``timeout`` seconds (default
:data:`DEFAULT_DHT_TIMEOUT`), or at once when the DHT process is not running.

Records expire; their owners re-store them every refresh period with an expiration of twice the
period (:class:`Refresher`), so an owner that goes away disappears within two periods.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

import pydantic.v1 as pyd

from umm.net.addresses import check_address
from umm.net.errors import AddressError, DHTUnavailableError, RecordError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_REFRESH_PERIOD = 60.0
HASH_RE = r"^[0-9a-f]{64}$"
_NETWORK_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_ENTRIES = 512
#: largest msgpack value :func:`store_value` stores (hivemind's own limit: 4 MiB per DHT RPC message)
MAX_VALUE_BYTES = 48 * 1024
#: largest expert record (msgpack; a usual one is ~400 bytes)
MAX_EXPERT_RECORD_BYTES = 4096
#: verdicts are packed into scores pages of at most this many msgpack bytes
PAGE_BYTES = 32 * 1024
#: scores pages a coordinator may write (fixed keys, so the DHT can check who writes them)
MAX_SCORE_PAGES = 128
#: verdicts one scores record may hold (far more than MAX_SCORE_PAGES pages would fit)
MAX_SCORED_EXPERTS = 100_000

# ---------------------------------------------------------------------------------------------
# keys


def check_network(network: str) -> str:
    if not isinstance(network, str) or not _NETWORK_RE.match(network):
        raise RecordError(f"invalid network name {network!r}: use 1-64 letters, digits, '-' or '_'")
    return network


def experts_key(network: str) -> str:
    return f"umm.{check_network(network)}.experts"


def scores_key(network: str) -> str:
    return f"umm.{check_network(network)}.scores"


def scores_page_key(network: str, page: int) -> str:
    if not isinstance(page, int) or not 0 <= page < MAX_SCORE_PAGES:
        raise RecordError(f"invalid scores page {page!r}: expected 0 to {MAX_SCORE_PAGES - 1}")
    return f"umm.{check_network(network)}.scores.{page}"


def merged_key(network: str) -> str:
    return f"umm.{check_network(network)}.merged"


def providers_key(network: str, manifest_hash: str) -> str:
    if not re.match(HASH_RE, manifest_hash or ""):
        raise RecordError(f"invalid manifest hash {manifest_hash!r}: expected 64 lowercase hex digits")
    return f"umm.{check_network(network)}.providers.{manifest_hash}"


def owner_marker(public_key: bytes) -> bytes:
    """The subkey under which only the holder of ``public_key`` (OpenSSH bytes) can write."""
    return b"[owner:" + bytes(public_key) + b"]"


def public_key_of_marker(marker: Any) -> bytes | None:
    """The public key inside an owner marker, or None when ``marker`` is not one."""
    if isinstance(marker, bytes) and marker.startswith(b"[owner:") and marker.endswith(b"]"):
        return marker[len(b"[owner:") : -1]
    return None


# ---------------------------------------------------------------------------------------------
# schemas (pydantic v1: the API hivemind's SchemaValidator uses; strict types, no coercion)

Hash = pyd.constr(strict=True, regex=HASH_RE)
Name = pyd.constr(strict=True, min_length=1, max_length=128)
Text = pyd.constr(strict=True, max_length=1024)


class Address(str):
    """A peer's ``host:port`` over TCP, checked by :func:`umm.net.addresses.check_address`."""

    @classmethod
    def __get_validators__(cls):
        yield cls._check

    @classmethod
    def _check(cls, v: Any) -> str:
        try:
            return check_address(v)
        except AddressError as e:
            raise ValueError(str(e)) from None


Count = pyd.conint(strict=True, ge=0)


def _bounded(value: dict | list, what: str) -> Any:
    if len(value) > _MAX_ENTRIES:
        raise ValueError(f"{what} has {len(value)} entries (at most {_MAX_ENTRIES})")
    return value


class _Record(pyd.BaseModel):
    schema_version: pyd.StrictInt = SCHEMA_VERSION

    class Config:
        extra = pyd.Extra.forbid
        allow_mutation = False

    @pyd.validator("schema_version")
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not {SCHEMA_VERSION} (peers run different umm versions)")
        return v


class ExpertRecord(_Record):
    """A contributor's announcement of one expert model (self-reported; the coordinator verifies)."""

    name: Name
    domains: list[Name]
    architecture: Text  # architecture fingerprint
    tokenizer: Text  # tokenizer fingerprint
    num_parameters: Count
    manifest_hash: Hash
    total_bytes: Count
    address: Address  # gRPC CheckpointService "host:port"
    self_scores: dict[Name, pyd.StrictFloat]
    base_model: Text | None
    software_version: Name

    _b1 = pyd.validator("domains", allow_reuse=True)(lambda v: _bounded(v, "domains"))
    _b2 = pyd.validator("self_scores", allow_reuse=True)(lambda v: _bounded(v, "self_scores"))

    @pyd.root_validator(skip_on_failure=True)
    def _small(cls, values: dict) -> dict:
        # every contributor's record travels in one DHT answer (at most 4 MiB): fat records would let
        # a few dozen keys make the experts key unreadable
        size = value_size(values)
        if size > MAX_EXPERT_RECORD_BYTES:
            raise ValueError(f"the record is {size} bytes (at most {MAX_EXPERT_RECORD_BYTES})")
        return values


class ExpertVerdict(pyd.BaseModel):
    """The coordinator's verdict on one expert (by manifest hash)."""

    admitted: pyd.StrictBool
    reason: Text
    scores: dict[Name, pyd.StrictFloat]  # verified scores per task
    ranks: dict[Name, pyd.conint(strict=True, ge=1)]  # rank per domain (1 = best)

    class Config:
        extra = pyd.Extra.forbid
        allow_mutation = False


class ScoresRecord(_Record):
    """Verified scores, admission verdicts and ranks, written by the coordinator only.

    Held in memory and in the coordinator's state; in the DHT it is an index and pages
    (:func:`scores_pages`)."""

    round: Count
    updated_at: pyd.StrictFloat
    experts: dict[Hash, ExpertVerdict]

    @pyd.validator("experts")
    def _b(cls, v: dict) -> dict:
        if len(v) > MAX_SCORED_EXPERTS:
            raise ValueError(f"experts has {len(v)} entries (at most {MAX_SCORED_EXPERTS})")
        return v


class ScoresIndex(_Record):
    """Which scores pages make up the coordinator's current :class:`ScoresRecord`."""

    round: Count
    updated_at: pyd.StrictFloat
    pages: pyd.conint(strict=True, ge=0, le=MAX_SCORE_PAGES)


class ScoresPage(_Record):
    """Page ``page`` of a :class:`ScoresRecord` (same ``round`` and ``updated_at`` as its index)."""

    round: Count
    updated_at: pyd.StrictFloat
    page: pyd.conint(strict=True, ge=0, lt=MAX_SCORE_PAGES)
    experts: dict[Hash, ExpertVerdict]

    _b = pyd.validator("experts", allow_reuse=True)(lambda v: _bounded(v, "experts"))


class MergedRecord(_Record):
    """The latest published merged (or fused) model, written by the coordinator only."""

    round: Count
    name: Name
    manifest_hash: Hash
    total_bytes: Count
    address: Address
    sources: list[Hash]
    method: Name
    recipe_hash: Hash
    scores: dict[Name, pyd.StrictFloat]
    source_scores: dict[Hash, dict[Name, pyd.StrictFloat]]
    published_at: pyd.StrictFloat
    #: why it was published: the decision's text, and its figures ``[diff, ci_low, ci_high]`` of the
    #: test objective against the best source and the previously published model (empty: none)
    decision: Text = ""
    diff_vs_best_source: pyd.conlist(pyd.StrictFloat, max_items=3) = []
    diff_vs_previous: pyd.conlist(pyd.StrictFloat, max_items=3) = []

    _b1 = pyd.validator("sources", allow_reuse=True)(lambda v: _bounded(v, "sources"))
    _b2 = pyd.validator("source_scores", allow_reuse=True)(lambda v: _bounded(v, "source_scores"))


class ProviderRecord(_Record):
    """A peer that serves the bytes of one model (``manifest_hash``) at ``address``."""

    manifest_hash: Hash
    address: Address


R = TypeVar("R", bound=_Record)


def to_value(record: _Record) -> dict[str, Any]:
    """The msgpack-able value stored in the DHT: every field, so strict schema checks match exactly."""
    return record.dict()


def parse_record(cls: type[R], value: Any) -> R:
    """Parse a DHT value into ``cls``; :class:`RecordError` for anything of the wrong shape."""
    if not isinstance(value, dict):
        raise RecordError(f"{cls.__name__}: expected a dictionary, got {type(value).__name__}")
    odd = [k for k in value if not isinstance(k, str)]
    if odd:
        raise RecordError(f"malformed {cls.__name__}: field names must be strings, got {odd[0]!r:.60}")
    try:
        record = cls.parse_obj(value)
    except pyd.ValidationError as e:
        raise RecordError(f"malformed {cls.__name__}: {e}") from e
    if to_value(record) != value:
        raise RecordError(f"malformed {cls.__name__}: values need type conversion or fields are missing")
    return record


def value_size(value: Any) -> int:
    """Bytes of ``value`` as hivemind serialises it (msgpack)."""
    from hivemind.utils import MSGPackSerializer

    return len(MSGPackSerializer.dumps(value))


def scores_pages(record: ScoresRecord, page_bytes: int = PAGE_BYTES, *,
                 drop_overflow: bool = False) -> tuple[ScoresIndex, list[ScoresPage]]:
    """``record`` as an index and pages of at most ``page_bytes`` msgpack bytes (verdicts in record order).

    A page takes verdicts while its size (page fields + each hash and verdict) stays within
    ``page_bytes``; :class:`RecordError` when one verdict alone does not fit or more than
    :data:`MAX_SCORE_PAGES` pages are needed, unless ``drop_overflow``: then the verdicts past the
    last page are left out (the record lists the most important first).
    """
    def page(i: int, experts: dict) -> ScoresPage:
        return ScoresPage(round=record.round, updated_at=record.updated_at, page=i, experts=experts)

    base = value_size(to_value(page(MAX_SCORE_PAGES - 1, {}))) + 4  # + the map header growing to 5 bytes
    groups: list[dict[str, ExpertVerdict]] = [{}]
    size = base
    for h, verdict in record.experts.items():
        item = value_size(h) + value_size(verdict.dict())
        if base + item > page_bytes:
            raise RecordError(f"the verdict on {h[:12]} is {item} bytes, over a scores page of {page_bytes} bytes")
        if size + item > page_bytes or len(groups[-1]) >= _MAX_ENTRIES:
            groups.append({})
            size = base
        groups[-1][h] = verdict
        size += item
    if not groups[-1]:
        groups.pop()
    if len(groups) > MAX_SCORE_PAGES and drop_overflow:
        left_out = sum(len(g) for g in groups[MAX_SCORE_PAGES:])
        logger.warning("scores of round %d: %d verdict(s) past %d pages left out", record.round, left_out,
                       MAX_SCORE_PAGES)
        groups = groups[:MAX_SCORE_PAGES]
    if len(groups) > MAX_SCORE_PAGES:
        raise RecordError(f"{len(record.experts)} verdicts need {len(groups)} scores pages (at most {MAX_SCORE_PAGES})")
    index = ScoresIndex(round=record.round, updated_at=record.updated_at, pages=len(groups))
    return index, [page(i, g) for i, g in enumerate(groups)]


# ---------------------------------------------------------------------------------------------
# validators


def _key_id(raw_key: str) -> bytes:
    from hivemind.dht.routing import DHTID

    return DHTID.generate(source=raw_key).to_bytes()


def dht_schema(network: str) -> type[pyd.BaseModel]:
    """The pydantic v1 model for hivemind's SchemaValidator: one field per fixed key of ``network``."""
    from hivemind.dht.schema import BytesWithPublicKey

    fields = {
        experts_key(network): (Optional[dict[BytesWithPublicKey, ExpertRecord | None]], None),  # noqa: UP045 (pydantic.v1 needs typing.Optional)
        scores_key(network): (Optional[dict[BytesWithPublicKey, ScoresIndex | None]], None),  # noqa: UP045 (pydantic.v1 needs typing.Optional)
        merged_key(network): (Optional[dict[BytesWithPublicKey, MergedRecord | None]], None),  # noqa: UP045 (pydantic.v1 needs typing.Optional)
    }
    for i in range(MAX_SCORE_PAGES):
        fields[scores_page_key(network, i)] = (Optional[dict[BytesWithPublicKey, ScoresPage | None]], None)  # noqa: UP045 (pydantic.v1 needs typing.Optional)
    return pyd.create_model(f"UmmRecords_{network.replace('-', '_')}", **fields)


def _coordinator_only_validator_class():
    from hivemind.dht.validation import RecordValidatorBase
    from hivemind.utils import MSGPackSerializer

    class CoordinatorOnlyValidator(RecordValidatorBase):
        """Rejects scores (index and pages) and merged entries whose subkey is not the coordinator's marker."""

        def __init__(self, network: str, coordinator_public_key: bytes):
            keys = [scores_key(network), merged_key(network)]
            keys += [scores_page_key(network, i) for i in range(MAX_SCORE_PAGES)]
            self._key_ids = {_key_id(k) for k in keys}
            self._owner = owner_marker(coordinator_public_key)

        def validate(self, record) -> bool:
            if record.key not in self._key_ids:
                return True
            try:
                subkey = MSGPackSerializer.loads(record.subkey)
            except Exception:
                return False
            if subkey != self._owner:
                logger.debug("refused a coordinator-only record under a foreign subkey")
                return False
            return True

    return CoordinatorOnlyValidator


def make_validators(network: str, local_key, coordinator_public_key: bytes | None = None) -> list:
    """hivemind record validators for ``network``: signatures (``local_key`` signs our writes),
    strict schemas, and, when ``coordinator_public_key`` is given, coordinator-only scores/merged."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator

    validators = [
        RSASignatureValidator(local_key),
        SchemaValidator(dht_schema(network), allow_extra_keys=True),
    ]
    if coordinator_public_key is not None:
        validators.append(_coordinator_only_validator_class()(network, bytes(coordinator_public_key)))
    return validators


# ---------------------------------------------------------------------------------------------
# announce / read

#: seconds a DHT call may take before :class:`DHTUnavailableError` (sending the request included)
DEFAULT_DHT_TIMEOUT = 30.0

_DHT_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_DHT_LOCKS_GUARD = threading.Lock()


def call_dht(dht, method: str, timeout: float = DEFAULT_DHT_TIMEOUT, **kwargs) -> Any:
    """``dht.<method>(**kwargs)`` with a bound: :class:`DHTUnavailableError` after ``timeout`` seconds.

    hivemind.DHT talks to its process over one pipe: sends from our threads are serialised, and a
    send runs in a helper thread, since it blocks for good once the pipe is full and the process
    stopped reading (stopped, hung). A request abandoned that way is not sent later.
    """
    import concurrent.futures

    if not dht.is_alive():
        raise DHTUnavailableError(f"DHT {method}: the DHT process is not running")
    with _DHT_LOCKS_GUARD:
        lock = _DHT_LOCKS.setdefault(dht, threading.Lock())
    deadline = time.monotonic() + timeout
    sent, abandoned = threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def send() -> None:
        with lock:
            if abandoned.is_set():  # the caller gave up while we waited for the pipe
                return
            try:
                out["future"] = getattr(dht, method)(return_future=True, **kwargs)
            except BaseException as e:
                out["error"] = e
            sent.set()

    threading.Thread(target=send, name=f"umm-dht-{method}", daemon=True).start()
    try:
        if not sent.wait(max(0.0, deadline - time.monotonic())):
            raise concurrent.futures.TimeoutError
        if "error" in out:
            raise out["error"]
        return _answer(dht, method, out["future"], deadline)
    except concurrent.futures.TimeoutError:
        abandoned.set()
        if "future" in out:
            out["future"].cancel()
        raise DHTUnavailableError(f"DHT {method}: no answer within {timeout:g} s (the DHT process is busy, "
                                  "stopped or gone)") from None


def _answer(dht, method: str, future, deadline: float) -> Any:
    """``future``'s result by ``deadline`` (TimeoutError after it); :class:`DHTUnavailableError` as
    soon as the DHT process is found gone (it would never answer)."""
    while True:
        try:
            return future.result(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
            if not dht.is_alive():
                future.cancel()
                raise DHTUnavailableError(f"DHT {method}: the DHT process exited before answering") from None


def dht_time() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


@dataclass(frozen=True)
class Entry(Generic[R]):
    """One parsed record read from the DHT, with its owner's public key and expiration time."""

    owner: bytes  # OpenSSH public key of the writer
    record: R
    expiration_time: float


def store_value(dht, key: str, subkey: bytes, value: dict | None, ttl: float, *,
                timeout: float = DEFAULT_DHT_TIMEOUT) -> bool:
    """Store ``value`` (None withdraws) under ``key``/``subkey`` until now + ``ttl``; True if stored.

    :class:`RecordError` for a value over :data:`MAX_VALUE_BYTES`; :class:`DHTUnavailableError`
    when the DHT does not answer within ``timeout`` seconds."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    size = value_size(value)
    if size > MAX_VALUE_BYTES:
        raise RecordError(f"a value of {size} bytes under {key} is over the {MAX_VALUE_BYTES}-byte limit of a record")
    return bool(call_dht(dht, "store", timeout, key=key, value=value, subkey=subkey, expiration_time=dht_time() + ttl))


def read_entries(dht, key: str, cls: type[R], *, owners: set[bytes] | None = None,
                 timeout: float = DEFAULT_DHT_TIMEOUT) -> dict[bytes, Entry[R]]:
    """All well-formed, unexpired entries under ``key`` (optionally only those of ``owners``), by owner.

    :class:`DHTUnavailableError` when the DHT does not answer within ``timeout`` seconds."""
    found = call_dht(dht, "get", timeout, key=key, latest=True)
    if found is None or not isinstance(getattr(found, "value", None), dict):
        return {}
    out: dict[bytes, Entry[R]] = {}
    now = dht_time()
    for subkey, item in found.value.items():
        owner = public_key_of_marker(subkey)
        if owner is None or (owners is not None and owner not in owners):
            continue
        value, expiration = getattr(item, "value", None), getattr(item, "expiration_time", None)
        if value is None or not isinstance(expiration, (int, float)) or expiration < now:
            continue
        try:
            out[owner] = Entry(owner, parse_record(cls, value), float(expiration))
        except RecordError as e:
            logger.debug("ignoring a malformed entry under %s: %s", key, e)
    return out


class NetworkRecords:
    """Typed announce/read of one network's records through a running ``hivemind.DHT``.

    ``key`` must be the private key given to :func:`make_validators` for this DHT (it signs our
    writes). ``coordinator_public_key`` is the only key whose scores/merged records are returned.
    Each DHT call raises :class:`DHTUnavailableError` after ``timeout`` seconds without an answer.
    """

    def __init__(self, dht, network: str, key, coordinator_public_key: bytes | None = None, *,
                 timeout: float = DEFAULT_DHT_TIMEOUT):
        from umm.net.keys import public_key_bytes

        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.dht = dht
        self.network = check_network(network)
        self.public_key = public_key_bytes(key)
        self.owner = owner_marker(self.public_key)
        self.coordinator_public_key = coordinator_public_key
        self.timeout = float(timeout)

    def _store(self, key: str, value: dict | None, ttl: float) -> bool:
        return store_value(self.dht, key, self.owner, value, ttl, timeout=self.timeout)

    def _read(self, key: str, cls: type[R], owners: set[bytes] | None = None) -> dict[bytes, Entry[R]]:
        return read_entries(self.dht, key, cls, owners=owners, timeout=self.timeout)

    # writes ------------------------------------------------------------------------------
    def announce_expert(self, record: ExpertRecord, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        return self._store(experts_key(self.network), to_value(record), ttl)

    def withdraw_expert(self, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        return self._store(experts_key(self.network), None, ttl)

    def publish_scores(self, record: ScoresRecord, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        """Store ``record`` as pages, then their index (:func:`scores_pages`; verdicts past the last
        page are left out); True if all were stored."""
        index, pages = scores_pages(record, drop_overflow=True)
        stored = [self._store(scores_page_key(self.network, p.page), to_value(p), ttl) for p in pages]
        return self._store(scores_key(self.network), to_value(index), ttl) and all(stored)

    def publish_merged(self, record: MergedRecord, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        return self._store(merged_key(self.network), to_value(record), ttl)

    def announce_provider(self, manifest_hash: str, address: str, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        record = ProviderRecord(manifest_hash=manifest_hash, address=address)
        return self._store(providers_key(self.network, manifest_hash), to_value(record), ttl)

    def withdraw_provider(self, manifest_hash: str, ttl: float = 2 * DEFAULT_REFRESH_PERIOD) -> bool:
        return self._store(providers_key(self.network, manifest_hash), None, ttl)

    # reads -------------------------------------------------------------------------------
    def experts(self) -> dict[bytes, Entry[ExpertRecord]]:
        """Every announced expert, by its contributor's public key."""
        return self._read(experts_key(self.network), ExpertRecord)

    def _coordinator_entry(self, key: str, cls: type[R]) -> Entry[R] | None:
        if self.coordinator_public_key is None:
            raise RecordError("no coordinator public key configured: scores and merged records cannot be trusted")
        owner = bytes(self.coordinator_public_key)
        return self._read(key, cls, owners={owner}).get(owner)

    def scores(self) -> Entry[ScoresRecord] | None:
        """The coordinator's scores record, read from its index and pages (the one read helper for scores).

        Only pages of the index's round and time count (records by any other key are ignored). A
        page that is missing or from another publication (being replaced right now) is left out:
        its verdicts are missing from the record until the next read."""
        index = self._coordinator_entry(scores_key(self.network), ScoresIndex)
        if index is None:
            return None
        idx = index.record
        experts: dict[str, ExpertVerdict] = {}
        expiration, missing = index.expiration_time, []
        for i in range(idx.pages):
            page = self._coordinator_entry(scores_page_key(self.network, i), ScoresPage)
            if page is None or (page.record.round, page.record.updated_at, page.record.page) != (idx.round, idx.updated_at, i):
                missing.append(i)
                continue
            experts.update(page.record.experts)
            expiration = min(expiration, page.expiration_time)
        if missing:
            logger.info("scores of round %d: %d of %d page(s) missing or being replaced", idx.round, len(missing),
                        idx.pages)
        record = ScoresRecord(round=idx.round, updated_at=idx.updated_at, experts=experts)
        return Entry(index.owner, record, expiration)

    def merged(self) -> Entry[MergedRecord] | None:
        """The coordinator's merged-model record (records by any other key are ignored)."""
        return self._coordinator_entry(merged_key(self.network), MergedRecord)

    def providers(self, manifest_hash: str) -> dict[bytes, Entry[ProviderRecord]]:
        """Peers announcing that they serve ``manifest_hash``, by public key."""
        entries = self._read(providers_key(self.network, manifest_hash), ProviderRecord)
        return {k: e for k, e in entries.items() if e.record.manifest_hash == manifest_hash}


# ---------------------------------------------------------------------------------------------
# refresh


class Refresher:
    """Re-runs announcements every ``period`` seconds with a TTL of ``2 * period``, in a thread.

    ``add(name, announce, withdraw)`` runs ``announce(ttl) -> bool`` at once (returning its result)
    and then every period until ``discard(name)`` or :meth:`stop`; adding an existing name replaces
    it. Failures are logged and retried at the next period. ``withdraw(ttl) -> bool``, if given, is
    what :meth:`withdraw_all` runs for that record when its owner leaves.
    """

    def __init__(self, period: float = DEFAULT_REFRESH_PERIOD, *, name: str = "umm-refresher"):
        if period <= 0:
            raise ValueError("refresh period must be positive")
        self.period = float(period)
        self.ttl = 2.0 * self.period
        self._jobs: dict[str, Callable[[float], bool]] = {}
        self._withdrawals: dict[str, Callable[[float], bool]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def add(self, name: str, announce: Callable[[float], bool],
            withdraw: Callable[[float], bool] | None = None) -> bool:
        with self._lock:
            self._jobs[name] = announce
            if withdraw is not None:
                self._withdrawals[name] = withdraw
            else:
                self._withdrawals.pop(name, None)
        return self._run(name, announce)

    def discard(self, name: str) -> None:
        """Stop refreshing ``name`` (its record then expires; it is not withdrawn)."""
        with self._lock:
            self._jobs.pop(name, None)
            self._withdrawals.pop(name, None)

    def withdraw_all(self) -> dict[str, bool]:
        """Stop refreshing, then run every record's ``withdraw``; by name, whether the DHT stored
        the withdrawal (a record not withdrawn expires within ``2 * period``)."""
        self.stop()
        with self._lock:
            jobs = list(self._withdrawals.items())
        out = {}
        for name, fn in jobs:
            try:
                out[name] = bool(fn(self.ttl))
            except Exception as e:  # e.g. the DHT is already gone: the record expires instead
                logger.info("withdrawing %s failed: %s", name, e)
                out[name] = False
            if not out[name]:
                logger.info("%s was not withdrawn; it expires within %.0f s", name, self.ttl)
        return out

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop refreshing; records then expire within ``2 * period``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def refresh_now(self) -> dict[str, bool]:
        with self._lock:
            jobs = list(self._jobs.items())
        return {name: self._run(name, fn) for name, fn in jobs}

    def _run(self, name: str, announce: Callable[[float], bool]) -> bool:
        try:
            ok = bool(announce(self.ttl))
        except Exception as e:  # keep refreshing the other records
            logger.warning("refreshing %s failed: %s", name, e)
            return False
        if not ok:
            logger.warning("refreshing %s: the DHT did not store the record", name)
        return ok

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.refresh_now()

    def __enter__(self) -> Refresher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
