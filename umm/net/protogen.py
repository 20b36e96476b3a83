"""Regenerate the gRPC/protobuf code in ``umm/net/proto/`` from ``protos/*.proto``.

The one command (run from the repository root, with grpcio-tools installed)::

    python -m umm.net.protogen           # rewrite umm/net/proto/*_pb2*.py(i)
    python -m umm.net.protogen --check   # exit 1 when the committed files are stale

Generated modules import each other package-relatively (``from . import x_pb2``), so they work
as ``umm.net.proto.x_pb2`` without touching ``sys.path``. The output depends on the grpcio-tools
version (it is written into the files), so regenerate with the version named in
``protos/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from umm.errors import UmmError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS_DIR = REPO_ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtogenError(UmmError):
    """protoc failed, or the sources are missing."""


def _is_generated(path: Path) -> bool:
    return path.is_file() and path.name.endswith(GENERATED_SUFFIXES)


def _relative_imports(text: str, own_modules: set[str]) -> str:
    """Rewrite ``import x_pb2 as y`` into ``from . import x_pb2 as y`` for our own modules."""

    def fix(match: re.Match[str]) -> str:
        module, alias = match.group(1), match.group(2)
        if module not in own_modules:
            return match.group(0)
        return f"from . import {module} as {alias}"

    return re.sub(r"^import (\w+_pb2) as (\w+)$", fix, text, flags=re.MULTILINE)


def generate(out_dir: Path, protos_dir: Path = PROTOS_DIR) -> list[Path]:
    """Run protoc on every ``protos_dir/*.proto`` into ``out_dir``; returns the files written."""
    try:
        from importlib.resources import files

        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ProtogenError("grpcio-tools is not installed: pip install 'umm[test]'") from e

    sources = sorted(protos_dir.glob("*.proto"))
    if not sources:
        raise ProtogenError(f"no .proto files in {protos_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{protos_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(s.name for s in sources),
    ]
    # protoc resolves the source names against -I; run it on bare names so that the file names
    # recorded in the descriptors are "umm_checkpoint.proto", independent of where the repo lives.
    rc = protoc.main(args)
    if rc != 0:
        raise ProtogenError(f"protoc failed with exit code {rc} on {', '.join(map(str, sources))}")
    own = {s.stem + "_pb2" for s in sources}
    written = sorted(p for p in out_dir.iterdir() if _is_generated(p))
    for path in written:
        text = path.read_text()
        fixed = _relative_imports(text, own)
        if fixed != text:
            path.write_text(fixed)
    return written


def versions() -> tuple[str | None, str | None]:
    """(installed grpcio-tools version, grpcio version the committed code was generated for)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("grpcio-tools")
    except PackageNotFoundError:
        installed = None
    committed = None
    for path in sorted(OUT_DIR.glob("*_pb2_grpc.py")):
        m = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), flags=re.MULTILINE)
        if m:
            committed = m.group(1)
            break
    return installed, committed


def stale_files(out_dir: Path = OUT_DIR, protos_dir: Path = PROTOS_DIR) -> list[str]:
    """Names of generated files in ``out_dir`` that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory(prefix="umm-protogen-") as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp), protos_dir)}
    current = {p.name: p.read_bytes() for p in out_dir.iterdir() if _is_generated(p)} if out_dir.is_dir() else {}
    return sorted(name for name in fresh.keys() | current.keys() if fresh.get(name) != current.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umm.net.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed code is stale")
    parser.add_argument("--protos", type=Path, default=PROTOS_DIR, help="folder of .proto sources")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of generated modules")
    ns = parser.parse_args(argv)
    try:
        if ns.check:
            stale = stale_files(ns.out, ns.protos)
            if stale:
                installed, committed = versions()
                print(f"stale generated code in {ns.out}: {', '.join(stale)}; run `python -m umm.net.protogen` "
                      f"(grpcio-tools installed: {installed}, committed code made with: {committed})", file=sys.stderr)
                return 1
            print(f"generated code in {ns.out} is up to date")
            return 0
        with tempfile.TemporaryDirectory(prefix="umm-protogen-") as tmp:
            fresh = generate(Path(tmp), ns.protos)
            ns.out.mkdir(parents=True, exist_ok=True)
            for old in ns.out.iterdir():
                if _is_generated(old):
                    old.unlink()
            for path in fresh:
                shutil.copyfile(path, ns.out / path.name)
        print(f"wrote {len(fresh)} files to {ns.out}")
        return 0
    except UmmError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
