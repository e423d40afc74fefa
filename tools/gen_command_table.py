#!/usr/bin/env python3
"""Generate redmesh's Redis command table from a live redis-server.

The proxy must know, for every command, its arity, its flags and where its
keys are. Rather than transcribing that by hand (and getting it subtly wrong),
this script asks Redis itself: it sends `COMMAND` (and `INFO server` for the
version) to a running redis-server and prints Rust source for
libs/resp/src/command/table.rs.

Usage (a throwaway server is enough; nothing is written to it):

    redis-server --port 30999 --save '' --daemonize yes --dir /tmp
    python3 tools/gen_command_table.py --port 30999 --out libs/resp/src/command/table.rs
    redis-cli -p 30999 shutdown nosave

The output is deterministic (commands and subcommands sorted by name, flags in
a fixed order) and already formatted the way rustfmt formats it with the
workspace's rustfmt.toml, so regenerating against the same Redis version gives
a byte-identical file; tests/tests/command_table.rs relies on that.

Only the Python standard library is used: RESP2 is simple enough to parse by
hand, and the script must run anywhere redis-server runs.
"""

import argparse
import socket
import sys

# Command flags as COMMAND reports them, in the order of the Rust constants in
# libs/resp/src/command/mod.rs (`pub mod flags`). An unknown flag is an error:
# the Rust side must learn about it before the table can be regenerated.
COMMAND_FLAGS = [
    "write",
    "readonly",
    "denyoom",
    "module",
    "admin",
    "pubsub",
    "noscript",
    "blocking",
    "loading",
    "stale",
    "skip_monitor",
    "skip_slowlog",
    "asking",
    "fast",
    "no_auth",
    "may_replicate",
    "sentinel",
    "only_sentinel",
    "no_mandatory_keys",
    "no_async_loading",
    "no_multi",
    "movablekeys",
    "allow_busy",
]

# Key-spec flags, in the order of `pub mod key_flags`.
KEY_SPEC_FLAGS = [
    "RO",
    "RW",
    "OW",
    "RM",
    "access",
    "update",
    "insert",
    "delete",
    "not_key",
    "incomplete",
    "variable_flags",
]

# rustfmt's default max_width, as set in the workspace's rustfmt.toml.
MAX_WIDTH = 100


class GenError(Exception):
    """A problem with the server's reply that makes the table untrustworthy."""


# --- RESP2 client -----------------------------------------------------------


class RespError(Exception):
    """An error reply (-ERR ...) from the server."""


def encode_command(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_line(stream):
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise GenError("connection closed in the middle of a reply")
    return line[:-2]


def read_reply(stream):
    """Reads one RESP2 reply; bulk and simple strings come back as str."""
    line = read_line(stream)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = stream.read(length + 2)
        if len(data) != length + 2:
            raise GenError("connection closed in the middle of a bulk string")
        return data[:-2].decode()
    if kind == b"*":
        length = int(rest)
        if length < 0:
            return None
        return [read_reply(stream) for _ in range(length)]
    raise GenError("unexpected RESP2 type byte %r" % kind)


def call(sock, stream, *args):
    sock.sendall(encode_command(*args))
    reply = read_reply(stream)
    if isinstance(reply, RespError):
        raise GenError("%s: %s" % (" ".join(args), reply))
    return reply


# --- COMMAND reply -> model ---------------------------------------------------


def pairs(flat):
    """A RESP2 flattened map (k1, v1, k2, v2, ...) as a dict."""
    if not isinstance(flat, list) or len(flat) % 2:
        raise GenError("expected a flattened map, got %r" % (flat,))
    return dict(zip(flat[0::2], flat[1::2]))


def check_flags(names, known, what):
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GenError(
            "unknown %s %s; add them to this script and to libs/resp/src/command/mod.rs"
            % (what, ", ".join(unknown))
        )
    return [n for n in known if n in names]


def parse_key_spec(raw, command):
    spec = pairs(raw)
    flags = check_flags(spec.get("flags", []), KEY_SPEC_FLAGS, "key-spec flag(s) of %s:" % command)

    begin = pairs(spec["begin_search"])
    begin_spec = pairs(begin["spec"]) if begin["spec"] else {}
    if begin["type"] == "index":
        begin_search = ("index", int(begin_spec["index"]))
    elif begin["type"] == "keyword":
        begin_search = ("keyword", begin_spec["keyword"], int(begin_spec["startfrom"]))
    elif begin["type"] == "unknown":
        begin_search = ("unknown",)
    else:
        raise GenError("%s: unknown begin_search type %r" % (command, begin["type"]))

    find = pairs(spec["find_keys"])
    find_spec = pairs(find["spec"]) if find["spec"] else {}
    if find["type"] == "range":
        find_keys = (
            "range",
            int(find_spec["lastkey"]),
            int(find_spec["keystep"]),
            int(find_spec["limit"]),
        )
    elif find["type"] == "keynum":
        find_keys = (
            "keynum",
            int(find_spec["keynumidx"]),
            int(find_spec["firstkey"]),
            int(find_spec["keystep"]),
        )
    elif find["type"] == "unknown":
        find_keys = ("unknown",)
    else:
        raise GenError("%s: unknown find_keys type %r" % (command, find["type"]))

    return {"begin": begin_search, "find": find_keys, "flags": flags}


def parse_command(raw):
    # Redis 7: name, arity, flags, first key, last key, step, ACL categories,
    # tips, key specs, subcommands.
    if not isinstance(raw, list) or len(raw) < 10:
        raise GenError("COMMAND entry without key specs (is this Redis 7+?): %r" % (raw,))
    name = raw[0].lower()
    return {
        "name": name,
        "arity": int(raw[1]),
        "flags": check_flags(raw[2], COMMAND_FLAGS, "command flag(s) of %s:" % name),
        "first_key": int(raw[3]),
        "last_key": int(raw[4]),
        "step": int(raw[5]),
        "key_specs": [parse_key_spec(spec, name) for spec in raw[8]],
        "subcommands": sorted((parse_command(sub) for sub in raw[9]), key=lambda c: c["name"]),
    }


def redis_version(info):
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    raise GenError("INFO server has no redis_version")


# --- Rust emitter -------------------------------------------------------------
#
# The layout below is exactly what rustfmt produces for these literals (struct
# literals always vertical, single-element arrays "overflowed" onto the
# opening line, `|` chains split one operand per line when too long), so the
# generated file passes `rustfmt --check` without a #[rustfmt::skip].


def rust_str(value):
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % ord(ch))
    out.append('"')
    return "".join(out)


def flag_expr(lines, indent, field, module, names):
    """`field: module::A | module::B,` on one line, or split like rustfmt."""
    pad = " " * indent
    if not names:
        lines.append("%s%s: 0," % (pad, field))
        return
    operands = ["%s::%s" % (module, n.upper()) for n in names]
    one_line = "%s%s: %s," % (pad, field, " | ".join(operands))
    if len(one_line) <= MAX_WIDTH:
        lines.append(one_line)
        return
    lines.append("%s%s: %s" % (pad, field, operands[0]))
    for operand in operands[1:-1]:
        lines.append("%s    | %s" % (pad, operand))
    lines.append("%s    | %s," % (pad, operands[-1]))


def struct_array(lines, indent, field, items, emit_item):
    """`field: &[...]` holding struct literals, laid out like rustfmt does."""
    pad = " " * indent
    if not items:
        lines.append("%s%s: &[]," % (pad, field))
    elif len(items) == 1:
        # rustfmt overflows a lone struct literal onto the `&[` line.
        emit_item(lines, indent, "%s%s: &[" % (pad, field), items[0])
        lines[-1] += "],"
    else:
        lines.append("%s%s: &[" % (pad, field))
        for item in items:
            emit_item(lines, indent + 4, " " * (indent + 4), item)
            lines[-1] += ","
        lines.append("%s]," % pad)


def emit_key_spec(lines, indent, opening, spec):
    """Emits `KeySpec { ... }` whose first line starts with `opening`; the
    caller appends the trailing punctuation to the last line."""
    pad = " " * (indent + 4)
    inner = " " * (indent + 8)
    lines.append("%sKeySpec {" % opening)
    begin = spec["begin"]
    if begin[0] == "index":
        lines.append("%sbegin: BeginSearch::Index(%d)," % (pad, begin[1]))
    elif begin[0] == "keyword":
        lines.append("%sbegin: BeginSearch::Keyword {" % pad)
        lines.append("%skeyword: %s," % (inner, rust_str(begin[1])))
        lines.append("%sstart_from: %d," % (inner, begin[2]))
        lines.append("%s}," % pad)
    else:
        lines.append("%sbegin: BeginSearch::Unknown," % pad)
    find = spec["find"]
    if find[0] == "range":
        lines.append("%sfind: FindKeys::Range {" % pad)
        lines.append("%slast_key: %d," % (inner, find[1]))
        lines.append("%sstep: %d," % (inner, find[2]))
        lines.append("%slimit: %d," % (inner, find[3]))
        lines.append("%s}," % pad)
    elif find[0] == "keynum":
        lines.append("%sfind: FindKeys::KeyNum {" % pad)
        lines.append("%skey_num_idx: %d," % (inner, find[1]))
        lines.append("%sfirst_key: %d," % (inner, find[2]))
        lines.append("%sstep: %d," % (inner, find[3]))
        lines.append("%s}," % pad)
    else:
        lines.append("%sfind: FindKeys::Unknown," % pad)
    flag_expr(lines, indent + 4, "flags", "key_flags", spec["flags"])
    lines.append("%s}" % (" " * indent))


def emit_command(lines, indent, opening, cmd):
    """Emits `CommandInfo { ... }`, like emit_key_spec."""
    pad = " " * (indent + 4)
    lines.append("%sCommandInfo {" % opening)
    lines.append("%sname: %s," % (pad, rust_str(cmd["name"])))
    lines.append("%sarity: %d," % (pad, cmd["arity"]))
    flag_expr(lines, indent + 4, "flags", "flags", cmd["flags"])
    lines.append("%sfirst_key: %d," % (pad, cmd["first_key"]))
    lines.append("%slast_key: %d," % (pad, cmd["last_key"]))
    lines.append("%sstep: %d," % (pad, cmd["step"]))
    struct_array(lines, indent + 4, "key_specs", cmd["key_specs"], emit_key_spec)
    struct_array(lines, indent + 4, "subcommands", cmd["subcommands"], emit_command)
    lines.append("%s}" % (" " * indent))


def render(version, commands):
    lines = [
        "//! Redis command metadata generated by tools/gen_command_table.py from redis-server %s."
        " Do not edit by hand; regenerate." % version,
        "//!",
        "//! Sorted by name (subcommands too) so that lookups can binary-search.",
        "",
        "use super::{flags, key_flags, BeginSearch, CommandInfo, FindKeys, KeySpec};",
        "",
        "/// The version of the redis-server this table was generated from.",
        "pub(super) const REDIS_VERSION: &str = %s;" % rust_str(version),
        "",
        "/// Every top-level command, sorted by name.",
        "pub(super) static COMMANDS: &[CommandInfo] = &[",
    ]
    for cmd in commands:
        emit_command(lines, 4, "    ", cmd)
        lines[-1] += ","
    lines.append("];")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="redis-server host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=6379, help="redis-server port (default: %(default)s)")
    parser.add_argument("--out", metavar="FILE", help="write the Rust source here instead of stdout")
    args = parser.parse_args()

    try:
        with socket.create_connection((args.host, args.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            version = redis_version(call(sock, stream, "INFO", "server"))
            commands = sorted(
                (parse_command(raw) for raw in call(sock, stream, "COMMAND")),
                key=lambda c: c["name"],
            )
    except (OSError, GenError, KeyError, ValueError) as err:
        print("gen_command_table: %s" % err, file=sys.stderr)
        return 1

    source = render(version, commands)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="\n") as out:
            out.write(source)
    else:
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
