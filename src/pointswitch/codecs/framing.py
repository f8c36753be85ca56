"""Length framing, sans-I/O.

A framer is fed bytes as they arrive and hands back whole frames. It raises
:class:`FramingError` when the length header itself is broken (not digits, zero,
or larger than the limit); the caller then closes the connection, because once
framing is lost nothing after it can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class FramingError(ValueError):
    """The length header is broken; the stream cannot be resynchronised."""


@dataclass(frozen=True)
class FramingSpec:
    name: str
    header_len: int
    binary: bool

    def encode_length(self, n: int) -> bytes:
        if self.binary:
            if n >= 1 << (8 * self.header_len):
                raise FramingError(f"frame of {n} bytes does not fit a {self.name} header")
            return n.to_bytes(self.header_len, "big")
        text = str(n)
        if len(text) > self.header_len:
            raise FramingError(f"frame of {n} bytes does not fit a {self.name} header")
        return text.zfill(self.header_len).encode("ascii")

    def decode_length(self, header: bytes) -> int:
        if self.binary:
            return int.from_bytes(header, "big")
        if not header.isdigit():
            raise FramingError(f"length header {header!r} is not {self.header_len} ASCII digits")
        return int(header)

    def frame(self, payload: bytes) -> bytes:
        return self.encode_length(len(payload)) + payload


FRAMINGS: dict[str, FramingSpec] = {
    "binary2": FramingSpec("binary2", 2, binary=True),
    "ascii4": FramingSpec("ascii4", 4, binary=False),
}


def framing(name: str) -> FramingSpec:
    try:
        return FRAMINGS[name]
    except KeyError:
        raise ValueError(f"unknown framing {name!r}; known: {', '.join(FRAMINGS)}") from None


@dataclass
class FrameDecoder:
    """Accumulates bytes and yields complete frames (without their length header)."""

    spec: FramingSpec
    max_frame_bytes: int
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        header_len = self.spec.header_len
        while len(self._buffer) >= header_len:
            length = self.spec.decode_length(bytes(self._buffer[:header_len]))
            if length == 0:
                raise FramingError("zero-length frame")
            if length > self.max_frame_bytes:
                raise FramingError(f"frame of {length} bytes exceeds limit {self.max_frame_bytes}")
            end = header_len + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[header_len:end]))
            del self._buffer[:end]
        return frames

    @property
    def partial(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return bool(self._buffer)
