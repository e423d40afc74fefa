#!/usr/bin/env python3
"""Writes docs/CONFIGURATION.md from the --help of every redmesh binary.

  tools/gen_config_reference.py [BIN_DIR]      print the reference
  tools/gen_config_reference.py BIN_DIR --write  update docs/CONFIGURATION.md

BIN_DIR defaults to target/debug. The help text is the source of truth
(clap's doc comments, environment variables and defaults), so the reference
cannot drift from the code: tests/tests/config_reference.rs regenerates it
and fails when the committed file differs.
"""

import os
import re
import subprocess
import sys

BINARIES = [
    "redmesh-proxy",
    "redmesh-broker",
    "redmesh-coordinator",
    "redmesh-health-checker",
    "redmesh-migrator",
    "redmeshctl",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION = re.compile(r"^\s{2,6}(?:-\w, )?(--[\w-]+)(?: <([\w_]+)>)?")
BRACKETS = re.compile(r"\s*\[(env|default|possible values): ([^\]]*)\]")


def help_text(path):
    return help_text_args(path, [])


def help_text_args(path, args):
    """`path args… --help`."""
    # No inherited REDMESH_* variables: clap would print their values as the
    # environment's, and a secret could end up in the document.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [path, *args, "--help"], env=env, capture_output=True, text=True, check=True
    ).stdout


def options(text):
    """(flag, value name, description, env, default, possible values)."""
    found, current = [], None
    in_options = False
    for line in text.splitlines():
        if line.startswith("Options:"):
            in_options = True
            continue
        if not in_options:
            continue
        if line and not line.startswith(" "):
            break  # another section
        m = OPTION.match(line)
        if m and not line.startswith(" " * 8):
            current = {"flag": m.group(1), "value": m.group(2) or "", "text": []}
            # Short help puts the description on the same line.
            rest = line[m.end():].strip()
            if rest:
                current["text"].append(rest)
            found.append(current)
        elif current is not None and line.strip():
            current["text"].append(line.strip())
    out = []
    for o in found:
        if o["flag"] in ("--help", "--version"):
            continue
        text = " ".join(o["text"])
        extra = {k: v for k, v in BRACKETS.findall(text)}
        desc = BRACKETS.sub("", text).strip()
        env = extra.get("env", "").split("=")[0]
        out.append((o["flag"], o["value"], desc, env, extra.get("default", ""), extra.get("possible values", "")))
    return out


def cell(s):
    return s.replace("|", "\\|")


def render(bin_dir):
    lines = [
        "# Configuration reference",
        "",
        "Every flag of every redmesh binary, with its environment variable and",
        "default. Generated from the binaries' `--help` by",
        "`tools/gen_config_reference.py` (`tests/tests/config_reference.rs` fails",
        "when this file is out of date); do not edit by hand.",
        "",
        "Every variable can also be set in the environment (the flag wins).",
        "Durations take units (`750ms`, `2s`, `1m`).",
        "",
    ]
    for b in BINARIES:
        text = help_text(os.path.join(bin_dir, b))
        about = text.splitlines()[0].strip()
        lines += [f"## {b}", "", about, ""]
        if b == "redmeshctl":
            lines += [
                "Global options below; the commands and their own options:",
                "`redmeshctl --help`, `redmeshctl <command> --help`.",
                "",
            ]
        lines += ["| flag | environment | default | meaning |", "|---|---|---|---|"]
        for flag, value, desc, env, default, possible in options(text):
            name = f"`{flag} <{value}>`" if value else f"`{flag}`"
            if possible:
                desc = f"{desc} (one of: {possible})"
            lines.append(
                f"| {name} | {f'`{env}`' if env else ''} | {f'`{default}`' if default else ''} | {cell(desc)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    bin_dir = args[0] if args else os.path.join(ROOT, "target", "debug")
    doc = render(bin_dir)
    if "--write" in sys.argv:
        with open(os.path.join(ROOT, "docs", "CONFIGURATION.md"), "w") as f:
            f.write(doc)
    else:
        sys.stdout.write(doc)


if __name__ == "__main__":
    main()
