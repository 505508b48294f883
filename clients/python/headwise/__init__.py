"""headwise: the Python client of the Headwise KV cache daemon (headwised).

    import numpy as np, headwise
    with headwise.Client("unix:///path/headwised.sock", token="dev-token") as c:
        c.register_layout("tiny", 2, 8, 2, 64, "f32")
        seq = c.create_sequence("tiny")
        c.append(seq, 0, k, v)                 # k, v: [T, kv_heads, head_dim] float32
        o, lse = c.attend(seq, 0, q)           # q: [q_heads, head_dim]

docs/python.md in the repository is the guide. The generated protobuf modules live outside the
source tree (see headwise/_stubs.py); they are importable as headwise.v1.service_pb2 etc.
"""

from headwise import _stubs

# The generated modules import each other as `headwise.v1.<name>_pb2`: make <stubs>/headwise a
# portion of this package so `headwise.v1` resolves to them.
__path__.append(str(_stubs.locate() / "headwise"))  # type: ignore[name-defined]

from headwise.client import (  # noqa: E402
    AttendOutput,
    Client,
    DecodeOutput,
    DecodeStream,
    HeadwiseError,
    Layout,
    PolicySpec,
    Sequence,
    StagedOutput,
    StagingRegion,
    from_bf16,
    to_bf16,
)

__version__ = "0.1.0"

__all__ = [
    "AttendOutput", "Client", "DecodeOutput", "DecodeStream", "HeadwiseError", "Layout",
    "PolicySpec", "Sequence", "StagedOutput", "StagingRegion", "from_bf16", "to_bf16",
]
