"""The committed generated gRPC code matches the .proto sources and imports as a package."""

from __future__ import annotations

import pytest

from umm.net import protogen


def test_generated_code_is_not_stale() -> None:
    pytest.importorskip("grpc_tools")
    stale = protogen.stale_files()
    installed, committed = protogen.versions()
    assert stale == [], (
        f"stale {stale}: regenerate with `python -m umm.net.protogen` "
        f"(grpcio-tools installed {installed}, committed code made with {committed}; see protos/README.md)"
    )


def test_stale_check_detects_an_edit(tmp_path) -> None:
    pytest.importorskip("grpc_tools")
    protos = tmp_path / "protos"
    protos.mkdir()
    for src in protogen.PROTOS_DIR.glob("*.proto"):
        (protos / src.name).write_text(src.read_text())
    out = tmp_path / "out"
    protogen.generate(out, protos)
    assert protogen.stale_files(out, protos) == []
    edited = protos / "umm_checkpoint.proto"
    edited.write_text(edited.read_text().replace("uint64 length = 4;", "uint64 length = 4;\n  bool x = 5;"))
    assert protogen.stale_files(out, protos) == ["umm_checkpoint_pb2.py", "umm_checkpoint_pb2.pyi"]


def test_generated_modules_import_package_relative() -> None:
    from umm.net.proto import umm_checkpoint_pb2, umm_checkpoint_pb2_grpc, umm_coordinator_pb2_grpc

    text = (protogen.OUT_DIR / "umm_checkpoint_pb2_grpc.py").read_text()
    assert "from . import umm_checkpoint_pb2" in text
    assert hasattr(umm_checkpoint_pb2_grpc, "CheckpointServiceStub")
    assert hasattr(umm_coordinator_pb2_grpc, "CoordinatorStatusServicer")
    chunk = umm_checkpoint_pb2.FileChunk(offset=5, data=b"abc")
    assert umm_checkpoint_pb2.FileChunk.FromString(chunk.SerializeToString()) == chunk
