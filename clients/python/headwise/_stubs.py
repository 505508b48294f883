"""Finds the generated protobuf/gRPC modules (headwise/v1/*_pb2.py).

They are not part of the source tree: the CMake target ``headwise_python_stubs`` generates them
with ``grpc_tools.protoc`` into ``<build>/python/headwise_pb/headwise/v1/``. This module returns
the root that holds ``headwise/v1/``, looked up in this order:

1. ``$HEADWISE_PY_STUBS`` (set by ctest; set it yourself for a build directory of your own);
2. ``<repo>/build/python/headwise_pb``, then any other ``<repo>/build*/python/headwise_pb``
   (newest first), when this package runs from a source checkout (``pip install -e``);
3. when ``grpc_tools`` is importable and the checkout's ``proto/`` is there: generated once into
   ``$XDG_CACHE_HOME/headwise/py-stubs/<hash of the .proto files>`` (``~/.cache`` by default).

``headwise/__init__.py`` appends ``<root>/headwise`` to the package's ``__path__``, so the
generated code's own imports (``from headwise.v1 import policy_pb2``) resolve.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

ENV_VAR = "HEADWISE_PY_STUBS"
_PROTOS = ("config", "durable", "policy", "service")


def _has_stubs(root: Path) -> bool:
    return (root / "headwise" / "v1" / "service_pb2.py").is_file() and (
        root / "headwise" / "v1" / "service_pb2_grpc.py"
    ).is_file()


def _repo_root() -> Optional[Path]:
    # <repo>/clients/python/headwise/_stubs.py
    here = Path(__file__).resolve()
    if len(here.parents) < 4:
        return None
    repo = here.parents[3]
    return repo if (repo / "proto" / "headwise" / "v1" / "service.proto").is_file() else None


def _generate_into_cache(repo: Path) -> Optional[Path]:
    try:
        from grpc_tools import protoc  # type: ignore
        import grpc_tools
    except ImportError:
        return None
    proto_root = repo / "proto"
    files = [proto_root / "headwise" / "v1" / f"{name}.proto" for name in _PROTOS]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "headwise" / "py-stubs" / digest.hexdigest()[:16]
    if _has_stubs(root):
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(f) for f in files],
        ]
    )
    if rc != 0:
        return None
    try:
        os.replace(tmp, root)
    except OSError:  # Another process won the race.
        pass
    return root if _has_stubs(root) else None


def locate() -> Path:
    """The root holding headwise/v1/*_pb2.py; ImportError saying what to do when there is none."""
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env)
        if _has_stubs(root):
            return root
        raise ImportError(
            f"${ENV_VAR}={env} holds no headwise/v1/service_pb2.py: build the CMake target "
            "headwise_python_stubs (cmake --build <build> --target headwise_python_stubs)"
        )
    repo = _repo_root()
    if repo is not None:
        default = repo / "build" / "python" / "headwise_pb"
        if _has_stubs(default):
            return default
        others = sorted(
            (p for p in repo.glob("build*/python/headwise_pb") if _has_stubs(p)),
            key=lambda p: (p / "headwise" / "v1" / "service_pb2.py").stat().st_mtime,
            reverse=True,
        )
        if others:
            return others[0]
        generated = _generate_into_cache(repo)
        if generated is not None:
            return generated
    raise ImportError(
        "headwise: the generated gRPC stubs were not found. Build them with "
        "`cmake --build build --target headwise_python_stubs` (needs the venv of "
        f"scripts/setup.sh) or point ${ENV_VAR} at <build>/python/headwise_pb"
    )
