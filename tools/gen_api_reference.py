#!/usr/bin/env python3
"""Writes docs/API.md, the API reference, from the comments in proto/.

  tools/gen_api_reference.py            print the reference
  tools/gen_api_reference.py --write    update docs/API.md

Needs protoc (Debian package protobuf-compiler) and the Python protobuf
package (target/pyenv, which tests/run.sh prepares, has it). The .proto
comments are the source of truth, as they are for reflection:
tests/tests/api_reference.rs regenerates this file and fails when the
committed one differs.
"""

import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
PACKAGE_DIR = os.path.join(PROTO_DIR, "redmesh", "v1")

# FieldDescriptorProto.Type numbers to proto names.
SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool",
    9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64",
    17: "sint32", 18: "sint64", 6: "fixed64", 7: "fixed32",
}


def descriptors():
    files = sorted(f for f in os.listdir(PACKAGE_DIR) if f.endswith(".proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "api.pb")
        subprocess.run(
            ["protoc", f"-I{PROTO_DIR}", "--include_source_info", f"--descriptor_set_out={out}"]
            + [f"redmesh/v1/{f}" for f in files],
            check=True,
        )
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    return fds.file


def comments(fd):
    """path tuple -> leading comment (trailing if there is none)."""
    out = {}
    for loc in fd.source_code_info.location:
        text = (loc.leading_comments or loc.trailing_comments).strip()
        if text:
            out[tuple(loc.path)] = " ".join(line.strip() for line in text.splitlines())
    return out


def type_name(field):
    if field.type_name:
        name = field.type_name.lstrip(".")
        name = name.removeprefix("redmesh.v1.")
        shown = f"[{name}](#{anchor(name)})" if "." not in name else f"`{name}`"
    else:
        shown = f"`{SCALARS.get(field.type, str(field.type))}`"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        shown = f"repeated {shown}"
    return shown


def anchor(name):
    return name.lower().replace(".", "")


def cell(s):
    return s.replace("|", "\\|")


def render_message(msg, path, notes, out, prefix=""):
    name = prefix + msg.name
    out += [f"### {name}", "", notes.get(path, ""), ""]
    if msg.field:
        out += ["| field | type | meaning |", "|---|---|---|"]
        for i, f in enumerate(msg.field):
            out.append(f"| `{f.name}` | {type_name(f)} | {cell(notes.get(path + (2, i), ''))} |")
        out.append("")
    for i, e in enumerate(msg.enum_type):
        render_enum(e, path + (4, i), notes, out, prefix=name + ".")
    for i, nested in enumerate(msg.nested_type):
        if nested.options.map_entry:
            continue
        render_message(nested, path + (3, i), notes, out, prefix=name + ".")


def render_enum(enum, path, notes, out, prefix=""):
    out += [f"### {prefix}{enum.name}", "", notes.get(path, ""), "", "| value | number | meaning |", "|---|---|---|"]
    for i, v in enumerate(enum.value):
        out.append(f"| `{v.name}` | {v.number} | {cell(notes.get(path + (2, i), ''))} |")
    out.append("")


def render():
    out = [
        "# API reference (`redmesh.v1`)",
        "",
        "Generated from the comments in `proto/redmesh/v1/` by",
        "`tools/gen_api_reference.py` (`tests/tests/api_reference.rs` fails when",
        "this file is out of date); do not edit by hand. The same comments travel",
        "with gRPC reflection, so `buf curl --list-methods` and grpcurl `describe`",
        "show them too.",
        "",
    ]
    for fd in descriptors():
        notes = comments(fd)
        out += [f"## {fd.name}", ""]
        for si, svc in enumerate(fd.service):
            out += [f"### service {svc.name}", "", notes.get((6, si), ""), ""]
            out += ["| method | request | response | meaning |", "|---|---|---|---|"]
            for mi, m in enumerate(svc.method):
                req = m.input_type.lstrip(".").removeprefix("redmesh.v1.")
                resp = m.output_type.lstrip(".").removeprefix("redmesh.v1.")
                req = ("stream " if m.client_streaming else "") + f"[{req}](#{anchor(req)})"
                resp = ("stream " if m.server_streaming else "") + f"[{resp}](#{anchor(resp)})"
                out.append(f"| `{m.name}` | {req} | {resp} | {cell(notes.get((6, si, 2, mi), ''))} |")
            out.append("")
        for i, msg in enumerate(fd.message_type):
            render_message(msg, (4, i), notes, out)
        for i, enum in enumerate(fd.enum_type):
            render_enum(enum, (5, i), notes, out)
    # Collapse the blank lines an empty comment leaves.
    text = "\n".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def main():
    doc = render()
    if "--write" in sys.argv:
        with open(os.path.join(ROOT, "docs", "API.md"), "w") as f:
            f.write(doc)
    else:
        sys.stdout.write(doc)


if __name__ == "__main__":
    main()
