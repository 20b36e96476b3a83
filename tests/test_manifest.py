"""Manifests: stable hashes, tamper detection, and strict validation of untrusted dicts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from umm.checkpoints import (
    CheckpointError,
    FileEntry,
    Manifest,
    ManifestMismatchError,
    build_manifest,
    sha256_file,
    verify_folder,
)

GOOD_HEX = "ab" * 32


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "nested.txt").write_text("nested")
    (root / "empty").write_bytes(b"")
    (root / ".partial.tmp").write_text("half-written download")  # skipped: dot-name
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_text("skipped too")
    return root


def test_build_lists_regular_files_sorted_with_digests(folder: Path) -> None:
    m = build_manifest(folder)
    assert [e.path for e in m.files] == ["config.json", "empty", "sub/nested.txt", "weights.bin"]
    entry = m.entry("weights.bin")
    assert entry is not None and entry.size == 256 * 40
    assert entry.sha256 == hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest()
    assert m.total_bytes == sum((folder / e.path).stat().st_size for e in m.files)
    verify_folder(folder, m)


def test_round_trip_and_stable_hash(folder: Path, tmp_path: Path) -> None:
    m = build_manifest(folder)
    again = Manifest.from_dict(json.loads(m.canonical_json()))
    assert again == m and again.hash == m.hash
    assert Manifest.from_json(json.dumps(m.to_dict(), indent=2)).hash == m.hash
    assert m.canonical_json() == json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    assert b'"schema_version":1' in m.canonical_json()
    assert len(m.hash) == 64
    # The same bytes elsewhere (and listed in another order) give the same manifest.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert build_manifest(copy).hash == m.hash
    assert Manifest(tuple(reversed(m.files))) == m
    # Any content change changes the hash.
    (copy / "sub" / "nested.txt").write_text("nesteD")
    assert build_manifest(copy).hash != m.hash


def test_changed_byte_is_detected(folder: Path) -> None:
    m = build_manifest(folder)
    data = bytearray((folder / "weights.bin").read_bytes())
    data[5000] ^= 1
    (folder / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ManifestMismatchError, match="weights.bin has sha256"):
        verify_folder(folder, m)


def test_missing_extra_and_resized_files_are_named(folder: Path) -> None:
    m = build_manifest(folder)
    (folder / "sub" / "nested.txt").unlink()
    with pytest.raises(ManifestMismatchError, match="missing sub/nested.txt"):
        verify_folder(folder, m)
    (folder / "sub" / "nested.txt").write_text("nested")
    (folder / "intruder.py").write_text("import os")
    with pytest.raises(ManifestMismatchError, match="unexpected intruder.py"):
        verify_folder(folder, m)
    (folder / "intruder.py").unlink()
    (folder / "config.json").write_text('{"model_type": "llama", "x": 1}')
    with pytest.raises(ManifestMismatchError, match="config.json is .* bytes, the manifest says"):
        verify_folder(folder, m)


def test_symlinks_are_refused(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", folder / "link")
    with pytest.raises(CheckpointError, match="link is a symbolic link"):
        build_manifest(folder)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(10_000))
    assert sha256_file(p, chunk_size=777) == hashlib.sha256(p.read_bytes()).hexdigest()


def _manifest_dict(path: Any = "a.bin", size: Any = 1, sha: Any = GOOD_HEX, **extra: Any) -> dict:
    entry = {"path": path, "size": size, "sha256": sha}
    entry.update(extra)
    return {"schema_version": 1, "files": [entry]}


@pytest.mark.parametrize(
    "bad",
    [
        _manifest_dict(path="../x"),
        _manifest_dict(path="a/../../x"),
        _manifest_dict(path="/etc/passwd"),
        _manifest_dict(path="a\\..\\x"),
        _manifest_dict(path="C:x"),
        _manifest_dict(path=""),
        _manifest_dict(path="a//b"),
        _manifest_dict(path="./a"),
        _manifest_dict(path=".hidden"),
        _manifest_dict(path="a\x00b"),
        _manifest_dict(path=5),
        _manifest_dict(path="x" * 2000),
        _manifest_dict(size=-1),
        _manifest_dict(size=1.5),
        _manifest_dict(size=True),
        _manifest_dict(size="1"),
        _manifest_dict(sha="AB" * 32),
        _manifest_dict(sha="ab" * 31),
        _manifest_dict(sha="zz" * 32),
        _manifest_dict(sha=None),
        _manifest_dict(mode=0o777),
        {"schema_version": 2, "files": []},
        {"schema_version": True, "files": []},
        {"schema_version": 1.0, "files": []},
        {"files": []},
        {"schema_version": 1, "files": {}},
        {"schema_version": 1, "files": [], "extra": 1},
        {"schema_version": 1, "files": ["a.bin"]},
        {
            "schema_version": 1,
            "files": [{"path": "a", "size": 1, "sha256": GOOD_HEX}, {"path": "a", "size": 2, "sha256": GOOD_HEX}],
        },
        {
            "schema_version": 1,
            "files": [{"path": "a", "size": 1, "sha256": GOOD_HEX}, {"path": "a/b", "size": 2, "sha256": GOOD_HEX}],
        },
        [],
        "manifest",
    ],
)
def test_hostile_manifests_are_rejected(bad: Any) -> None:
    with pytest.raises(CheckpointError):
        Manifest.from_dict(bad)


def test_valid_dict_accepted_and_entries_validated_directly() -> None:
    m = Manifest.from_dict(_manifest_dict(path="dir/model-00001-of-00002.safetensors", size=0))
    assert m.files[0].path == "dir/model-00001-of-00002.safetensors"
    with pytest.raises(CheckpointError):
        FileEntry("../evil", 1, GOOD_HEX)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Manifest.from_json(b"{nope")


def _entries(paths: list[str]) -> dict:
    return {"schema_version": 1, "files": [{"path": p, "size": 0, "sha256": GOOD_HEX} for p in paths]}


def test_manifests_are_bounded_by_entries_depth_folders_and_size_not_only_bytes() -> None:
    """Zero-byte files in deep trees cost inodes while total_bytes is 0 (issue 13, finding 10)."""
    from umm.checkpoints.manifest import (
        MAX_DEPTH,
        MAX_DIRS,
        MAX_FILES,
        MAX_MANIFEST_BYTES,
        MAX_NAME_CHARS,
    )

    deep = "/".join(["d"] * MAX_DEPTH)
    assert Manifest.from_dict(_entries([deep])).total_bytes == 0  # at the limit: fine
    with pytest.raises(CheckpointError, match=f"levels deep, more than {MAX_DEPTH}"):
        Manifest.from_dict(_entries([deep + "/x"]))
    with pytest.raises(CheckpointError, match=f"more than the {MAX_FILES} allowed"):
        Manifest.from_dict(_entries([f"f{i}" for i in range(MAX_FILES + 1)]))
    # the reported attack: a small manifest whose paths open a new chain of folders each
    trees = [f"t{i}/" + "/".join(f"n{j}" for j in range(MAX_DEPTH - 2)) + "/f" for i in range(200)]
    with pytest.raises(CheckpointError, match=f"more than {MAX_DIRS} folders"):
        Manifest.from_dict(_entries(trees))
    with pytest.raises(CheckpointError, match=f"over {MAX_NAME_CHARS} characters"):
        Manifest.from_dict(_entries(["a" * (MAX_NAME_CHARS + 1)]))
    with pytest.raises(CheckpointError, match="bytes of JSON"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))


def test_pathological_json_is_a_checkpoint_error() -> None:
    for raw in [b"[" * 100_000 + b"]" * 100_000, b'{"schema_version": 1, "files": [{"size": ' + b"9" * 5000 + b"}]}",
                b"\xff\xfe", b"{"]:
        with pytest.raises(CheckpointError):
            Manifest.from_json(raw)
