"""Property-based fuzzing (hypothesis) of what a stranger's model folder feeds our parsers.

For arbitrary bytes and arbitrary JSON (any nesting), the safetensors header parser, the bounded
JSON reader, config.json checks and tokenizer fingerprinting either succeed or raise the documented
:class:`~umm.checkpoints.errors.CheckpointError` (subclass); nothing else may come out.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umm.checkpoints import CheckpointError, CorruptCheckpointError, admit, tokenizer_fingerprint
from umm.checkpoints.budget import check_config_budget, check_parameter_count
from umm.checkpoints.loading import check_model_config
from umm.checkpoints.reader import Checkpoint, parse_safetensors_header
from umm.checkpoints.safejson import MAX_JSON_DEPTH, loads_bounded, nesting_problem

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
size_keys = st.sampled_from(["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                             "intermediate_size", "max_position_embeddings", "vocab_size", "head_dim",
                             "attention_types", "text_config", "rope_scaling", "tie_word_embeddings"])


def _nested(depth: int, opener: str = "[") -> str:
    """JSON text ``depth`` levels deep: ``[[1]]`` or ``{"a":{"a":1}}``."""
    if opener == "{":
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "1" + "]" * depth


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="umm-fuzz-") as d:
        yield Path(d)


# --- safetensors headers --------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=400))
def test_header_of_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_safetensors_header(io.BytesIO(data), "f", len(data))
    except CorruptCheckpointError:
        pass


def _header_file(header: bytes, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + tail


@FUZZ
@given(json_values, st.binary(max_size=64))
def test_header_of_arbitrary_json(value: object, tail: bytes) -> None:
    data = _header_file(json.dumps(value).encode(), tail)
    try:
        parse_safetensors_header(io.BytesIO(data), "f", len(data))
    except CorruptCheckpointError:
        pass


@FUZZ
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "X"]) | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 200), min_size=2, max_size=2) | json_values,
}), max_size=4), st.binary(max_size=200))
def test_header_of_tensor_like_entries(entries: dict, tail: bytes) -> None:
    data = _header_file(json.dumps(entries).encode(), tail)
    try:
        header = parse_safetensors_header(io.BytesIO(data), "f", len(data))
    except CorruptCheckpointError:
        return
    covered = sorted(t.byte_range for t in header.tensors)  # accepted: the tensors tile the data exactly
    assert sum(end - start for start, end in covered) == len(tail)


@FUZZ
@given(st.integers(1, 3000), st.sampled_from(["[", "{"]))
def test_header_nesting_is_bounded_not_a_recursion_error(depth: int, opener: str) -> None:
    data = _header_file(('{"__metadata__": {}, "x": ' + _nested(depth, opener) + "}").encode())
    with pytest.raises(CorruptCheckpointError, match="nests deeper" if depth + 1 > MAX_JSON_DEPTH else "tensor"):
        parse_safetensors_header(io.BytesIO(data), "f", len(data))


# --- bounded JSON ---------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=300))
def test_bounded_json_of_arbitrary_bytes(data: bytes) -> None:
    try:
        loads_bounded(data, "f")
    except CorruptCheckpointError:
        pass


@FUZZ
@given(json_values)
def test_bounded_json_reads_what_json_writes(value: object) -> None:
    assert loads_bounded(json.dumps(value).encode(), "f") == value


@FUZZ
@given(st.integers(1, 2 * MAX_JSON_DEPTH), st.sampled_from(["[", "{"]), st.text(alphabet='[]{}"\\x', max_size=10))
def test_nesting_depth_is_measured_outside_strings(depth: int, opener: str, noise: str) -> None:
    text = json.dumps({"s": noise, "v": json.loads(_nested(depth, opener))})
    problem = nesting_problem(text)
    assert (problem is None) == (depth + 1 <= MAX_JSON_DEPTH)  # +1: the outer object


# --- config.json ----------------------------------------------------------------------------------

@FUZZ
@given(st.dictionaries(size_keys | st.text(max_size=8), json_values, max_size=6), st.integers(0, 10**7))
def test_config_checks_of_arbitrary_configs(extra: dict, stored: int) -> None:
    config = {"model_type": "llama", **extra}
    try:
        check_model_config(config, "f")
        check_config_budget(config, "f")
        check_parameter_count(config, stored, "f")
    except CheckpointError:
        pass


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_open_with_arbitrary_config_bytes(scratch: Path, data: bytes) -> None:
    folder = scratch / "cfg"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    (folder / "model.safetensors").write_bytes(_header_file(b"{}"))
    try:
        Checkpoint.open(folder).close()
    except CheckpointError:
        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size_keys, json_values | st.integers(-3, 10**6))
def test_admission_of_a_real_model_with_one_fuzzed_config_key(tiny_models: dict[str, Path], scratch: Path,
                                                               key: str, value: object) -> None:
    """The tiny model with one config key set to anything: admitted or a CheckpointError, never a crash
    (transformers itself runs here: it builds the model on the meta device)."""
    folder = scratch / "admit"
    if not folder.exists():
        shutil.copytree(tiny_models["base"], folder)
    config = json.loads((tiny_models["base"] / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    try:
        admit(folder)
    except CheckpointError:
        pass


# --- tokenizer files ------------------------------------------------------------------------------

def _tokenizer_folder(scratch: Path, name: str, data: bytes) -> Path:
    folder = scratch / "tok"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    (folder / name).write_bytes(data)
    return folder


tokenizer_json_like = st.fixed_dictionaries({
    "model": st.fixed_dictionaries({"vocab": json_values | st.dictionaries(st.text(max_size=4), json_values)})
    | json_values,
    "added_tokens": json_values | st.lists(st.fixed_dictionaries({"id": json_values, "content": json_values})),
})


@FUZZ
@given(st.sampled_from(["tokenizer.json", "vocab.json", "vocab.txt", "added_tokens.json"]),
       st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | tokenizer_json_like.map(lambda v: json.dumps(v).encode()))
def test_tokenizer_fingerprint_of_arbitrary_files(scratch: Path, name: str, data: bytes) -> None:
    folder = _tokenizer_folder(scratch, name, data)
    if name == "added_tokens.json":
        (folder / "vocab.json").write_text('{"a": 0}')
    try:
        result = tokenizer_fingerprint(folder)
    except CorruptCheckpointError:
        return
    assert result is None or len(result) == 64


@FUZZ
@given(st.integers(1, 3000))
def test_tokenizer_nesting_is_bounded(scratch: Path, depth: int) -> None:
    folder = _tokenizer_folder(scratch, "tokenizer.json", ('{"model": {"vocab": {}}, "x": ' + _nested(depth) + "}")
                               .encode())
    if depth + 1 > MAX_JSON_DEPTH:
        with pytest.raises(CorruptCheckpointError, match="nests deeper"):
            tokenizer_fingerprint(folder)
    else:
        assert len(tokenizer_fingerprint(folder) or "") == 64
