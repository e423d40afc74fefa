#!/usr/bin/env python3
"""Loads and checks the data set of the migration benchmark.

Used by tests/bench/migration.sh for both systems (redmesh and the official
Redis Cluster), so both hold byte-for-byte the same keys and values:

  migration_data.py load   SEED KEYS SIZE   write keys k:0..k:KEYS-1
  migration_data.py verify SEED KEYS SIZE   check every key has its value
  migration_data.py owners SEED FILE        save the slot map to FILE
  migration_data.py moved  SEED FILE KEYS   count keys whose owner is no
                                            longer the one saved in FILE

SEED is HOST:PORT of any node (a redmesh proxy or an official node). The
slot map comes from CLUSTER SLOTS at SEED, and every command goes straight
to the address owning the key's slot, pipelined over one raw socket per
address: a loader in pure Python through a client library would take longer
than the migration it prepares. Standard library only (no redis-py), so the
benchmark needs nothing beyond python3.

Values are deterministic (the key's index, then filler from a fixed seed),
so `verify` can tell a value that moved intact from one that did not.
"""

import binascii
import random
import socket
import sys

CHUNK = 5000  # commands per write; replies are read before the next write


def slot(key: bytes) -> int:
    """Redis Cluster hash slot (CRC16-XMODEM, which binascii.crc_hqx is)."""
    s = key.find(b"{")
    if s != -1:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1 : e]
    return binascii.crc_hqx(key, 0) & 16383


def command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    """A raw RESP connection that pipelines and reads replies."""

    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.addr = addr
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise SystemExit(f"{self.addr} closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i != -1:
                line, self.buf = self.buf[:i], self.buf[i + 2 :]
                return line
            self._fill()

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise SystemExit(f"{self.addr} answered an error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise SystemExit(f"{self.addr}: unexpected reply {line[:80]!r}")

    def pipeline(self, cmds):
        self.sock.sendall(b"".join(cmds))
        return [self.reply() for _ in cmds]


def slot_map(seed: str):
    """owner[slot] = "host:port" of the master serving it, from CLUSTER SLOTS."""
    owner = [None] * 16384
    for entry in Conn(seed).pipeline([command(b"CLUSTER", b"SLOTS")])[0]:
        lo, hi, master = entry[0], entry[1], entry[2]
        addr = f"{master[0].decode()}:{master[1]}"
        for s in range(lo, hi + 1):
            owner[s] = addr
    missing = sum(1 for o in owner if o is None)
    if missing:
        raise SystemExit(f"{seed}: {missing} slots have no master in CLUSTER SLOTS")
    return owner


def value(i: int, size: int, filler: bytes) -> bytes:
    head = b"%d:" % i
    return (head + filler)[:size] if size > len(head) else head


def by_owner(seed: str, keys: int):
    """{addr: [index, ...]} for keys k:0 .. k:keys-1."""
    owner = slot_map(seed)
    groups = {}
    for i in range(keys):
        groups.setdefault(owner[slot(b"k:%d" % i)], []).append(i)
    return groups


def load(seed: str, keys: int, size: int, filler: bytes):
    for addr, idx in by_owner(seed, keys).items():
        c = Conn(addr)
        for at in range(0, len(idx), CHUNK):
            part = idx[at : at + CHUNK]
            replies = c.pipeline([command(b"SET", b"k:%d" % i, value(i, size, filler)) for i in part])
            bad = [r for r in replies if r != b"OK"]
            if bad:
                raise SystemExit(f"{addr}: SET answered {bad[0]!r}")
    print(f"loaded {keys} keys of {size} bytes")


def verify(seed: str, keys: int, size: int, filler: bytes):
    wrong = 0
    for addr, idx in by_owner(seed, keys).items():
        c = Conn(addr)
        for at in range(0, len(idx), CHUNK):
            part = idx[at : at + CHUNK]
            got = c.pipeline([command(b"GET", b"k:%d" % i) for i in part])
            for i, v in zip(part, got):
                if v != value(i, size, filler):
                    wrong += 1
                    if wrong <= 5:
                        print(f"k:{i} at {addr}: {'missing' if v is None else 'wrong value'}", file=sys.stderr)
    if wrong:
        raise SystemExit(f"{wrong} of {keys} keys are missing or wrong after the migration")
    print(f"verified {keys} keys")


def moved(seed: str, before_file: str, keys: int):
    """Keys of the data set whose slot changed owner since FILE was saved."""
    with open(before_file) as f:
        before = f.read().split()
    now = slot_map(seed)
    changed = [before[s] != now[s] for s in range(16384)]
    print(sum(1 for i in range(keys) if changed[slot(b"k:%d" % i)]))


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    op, seed = sys.argv[1], sys.argv[2]
    if op == "owners" and len(sys.argv) == 4:
        with open(sys.argv[3], "w") as f:
            f.write("\n".join(slot_map(seed)) + "\n")
        return
    if op == "moved" and len(sys.argv) == 5:
        return moved(seed, sys.argv[3], int(sys.argv[4]))
    if op not in ("load", "verify") or len(sys.argv) != 5:
        raise SystemExit(__doc__)
    keys, size = int(sys.argv[3]), int(sys.argv[4])
    filler = random.Random(6).randbytes(max(size, 1))
    (load if op == "load" else verify)(seed, keys, size, filler)


if __name__ == "__main__":
    main()
