"""Property-based fuzzing of DHT record values (hypothesis): whatever msgpack-able value a peer
stores, parsing it as an expert, scores, merged or provider record raises nothing but
:class:`RecordError`, and the read helpers drop it instead of failing."""

from __future__ import annotations

import concurrent.futures
import functools
import time
from dataclasses import dataclass
from typing import Any

from hivemind.utils import MSGPackSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from umm.net import records
from umm.net.errors import RecordError
from umm.net.records import (
    ExpertRecord,
    ExpertVerdict,
    MergedRecord,
    NetworkRecords,
    ProviderRecord,
    ScoresIndex,
    ScoresPage,
)

H1, H2 = "1" * 64, "2" * 64
FUZZ = settings(max_examples=150, deadline=None)

VALID: dict[type, dict[str, Any]] = {
    ExpertRecord: records.to_value(ExpertRecord(
        name="m", domains=["math"], architecture="a", tokenizer="t", num_parameters=1, manifest_hash=H1,
        total_bytes=2, address="127.0.0.1:5", self_scores={"gsm8k": 0.5}, base_model=None, software_version="0.1")),
    ScoresIndex: records.to_value(ScoresIndex(round=1, updated_at=1.0, pages=1)),
    ScoresPage: records.to_value(ScoresPage(round=1, updated_at=1.0, page=0, experts={
        H1: ExpertVerdict(admitted=True, reason="ok", scores={"gsm8k": 0.5}, ranks={"math": 1})})),
    MergedRecord: records.to_value(MergedRecord(
        round=1, name="m", manifest_hash=H1, total_bytes=1, address="127.0.0.1:6", sources=[H1], method="ties",
        recipe_hash=H2, scores={"gsm8k": 0.7}, source_scores={H1: {"gsm8k": 0.5}}, published_at=1.0)),
    ProviderRecord: records.to_value(ProviderRecord(manifest_hash=H1, address="127.0.0.1:7")),
}
CLASSES = list(VALID)

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=70) | st.binary(max_size=40)
          | st.sampled_from([H1, "127.0.0.1:1", "math", 1, 0, -1, 1.0]))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12) | st.binary(max_size=8) | st.sampled_from([H1, H2]),
                      inner, max_size=4),
    max_leaves=25,
)


@st.composite
def mutated(draw) -> tuple[type, Any]:
    """A valid record of a random kind with one field replaced, dropped or added (or whole junk)."""
    cls = draw(st.sampled_from(CLASSES))
    value = dict(VALID[cls])
    how = draw(st.sampled_from(["replace", "drop", "add", "junk"]))
    if how == "junk":
        return cls, draw(values)
    field = draw(st.sampled_from(sorted(value)))
    if how == "replace":
        value[field] = draw(values)
    elif how == "drop":
        del value[field]
    else:
        value[draw(st.text(max_size=12) | st.binary(max_size=8))] = draw(values)
    return cls, value


def as_stored(value: Any) -> Any:
    """What a reader gets back: the value after hivemind's msgpack round trip (map keys are
    strings or bytes: hivemind cannot decode others, so no peer can deliver them)."""
    return MSGPackSerializer.loads(MSGPackSerializer.dumps(value))


def parse_or_record_error(cls: type, value: Any) -> None:
    try:
        parsed = records.parse_record(cls, value)
    except RecordError:
        return
    assert records.to_value(parsed) == value  # accepted only when it is exactly a valid record


@FUZZ
@given(mutated())
def test_mutated_records_raise_only_record_error(case):
    cls, value = case
    parse_or_record_error(cls, as_stored(value))


@FUZZ
@given(st.sampled_from(CLASSES), values)
def test_arbitrary_values_raise_only_record_error(cls, value):
    parse_or_record_error(cls, as_stored(value))


def test_valid_records_still_parse():
    for cls, value in VALID.items():
        assert records.to_value(records.parse_record(cls, as_stored(value))) == value


@dataclass
class Item:
    value: Any
    expiration_time: Any


class JunkDHT:
    """A DHT whose every key holds ``entries`` (subkey -> value) for the reader to cope with."""

    def __init__(self, entries: Any, expiration: Any):
        self.entries, self.expiration = entries, expiration

    def is_alive(self) -> bool:
        return True

    def get(self, key, latest, return_future):
        future: concurrent.futures.Future = concurrent.futures.Future()
        found = Item(self.entries, self.expiration)
        if isinstance(self.entries, dict):
            found = Item({k: Item(v, self.expiration) for k, v in self.entries.items()}, self.expiration)
        future.set_result(found)
        return future


COORD = b"coordinator-public-key"


@functools.cache
def reader_key():
    from umm.net import keys

    return keys.generate_key()


@FUZZ
@given(
    st.dictionaries(st.sampled_from([records.owner_marker(COORD), records.owner_marker(b"other"), b"plain", "s"]),
                    values | mutated().map(lambda c: c[1]), max_size=3) | values,
    st.sampled_from([time.time() + 600, 0.0, None, "soon"]),
)
def test_readers_drop_malformed_values_without_failing(entries, expiration):
    reader = NetworkRecords(JunkDHT(as_stored(entries), expiration), "fuzz", reader_key(), COORD)
    for read in (reader.experts, reader.scores, reader.merged, lambda: reader.providers(H1)):
        try:
            read()
        except RecordError:
            pass
