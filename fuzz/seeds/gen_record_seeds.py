#!/usr/bin/env python3
"""Writes the record_decode seeds: valid records laid out as crates/herald-log/src/record.rs
documents (little-endian header, stream name, payload, CRC32C over bytes [8, 4 + len)),
plus one truncated record. Run: python3 fuzz/seeds/gen_record_seeds.py"""
import struct, os
HERE = os.path.dirname(os.path.abspath(__file__))
POLY = 0x82F63B78
T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    T.append(c)
def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = T[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
assert crc32c(b"123456789") == 0xE3069283

def record(kind, batch_left, position, version, at, stream, payload=b""):
    s = stream.encode()
    body = struct.pack("<BBHIQQq", kind, 0, len(s), batch_left, position, version, at) + s + payload
    return struct.pack("<I", len(body) + 4) + struct.pack("<I", crc32c(body)) + body

ev = open(os.path.join(HERE, "envelope_parse", "minimal.json"), "rb").read()
full = open(os.path.join(HERE, "envelope_parse", "all-attributes.json"), "rb").read()
out = {
    "event-minimal.bin": record(1, 0, 0, 0, 1_700_000_000_000_000, "order-1", ev),
    "event-full.bin": record(1, 0, 12345, 7, 1_717_171_717_171_717, "order-42", full),
    "stream-deleted.bin": record(2, 0, 99, 41, 1_700_000_000_000_001, "cart@user:7"),
    "event-empty-payload-negative-time.bin": record(1, 0, 2**64 - 1, 2**64 - 1, -1, "s"),
    "event-longest-stream.bin": record(1, 0, 1, 0, 0, "x" * 256, b"{}"),
    "batch-of-three.bin": record(1, 2, 10, 0, 5, "a.b", b'{"n":1}') + record(1, 1, 11, 1, 5, "a.b", b'{"n":2}') + record(1, 0, 12, 0, 5, "c-d", b'{"n":3}'),
}
out["event-truncated.bin"] = out["event-minimal.bin"][:-5]
for name, data in out.items():
    open(os.path.join(HERE, "record_decode", name), "wb").write(data)
