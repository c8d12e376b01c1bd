"""The hypothesis strategies and protocol example the protobuf and length-delimited framing tests
share: frames with any index, tags, data and message, and PROTOCOL.md's example frame."""

from __future__ import annotations

from hypothesis import strategies as st

from qserve.wire.protobuf import Frame

U64 = 2**64 - 1

indexes = st.one_of(st.integers(0, U64), st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**63, U64]))
texts = st.text(max_size=20)  # hypothesis' default alphabet leaves out surrogates
tag_dicts = st.dictionaries(texts, texts, max_size=6)
datas = st.binary(max_size=300)
frames = st.builds(Frame, index=indexes, tags=tag_dicts, data=datas, message=texts)

EXAMPLE_FRAME = bytes.fromhex("088908 120f0a09") + b"requestId" + b"\x12\x02ab" + b"\x1a\x04[{}]"
