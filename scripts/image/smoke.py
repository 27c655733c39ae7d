"""`make test-image`: smoke-test the built image the way the Helm chart runs it.

The chart is rendered with helm (its defaults, plus a free metrics port, the broker's address and
topic names of this run); the container then gets exactly the chart's arguments, environment,
user and volume mounts (config read-only at /etc/infogrowth, /tmp, the state volume), and the
image's root file system must stay untouched (``readOnlyRootFilesystem``). Containers run with
``buildah run --isolation chroot`` and share the host's network, so a Kafka broker started here
on loopback is reachable from inside. That broker (a JVM: the image has no Java) comes from the
host's development install (infogrowth-dev); the test data is made here; everything else runs
inside the image.

Checks, in order; the first failure stops the run with exit 1 and says what failed:

1. the image's user, entrypoint, command, working directory and model cache match the chart;
2. ``infogrowth --help`` lists exactly the runtime commands (no tooling), each answers
   ``--help``; ``--version``;
3. ``infogrowth curate`` on a small JSONL of precomputed embeddings (one output per line);
4. ``topics create`` (the chart's topics Job), ``produce``, then ``run --role all
   --exit-when-idle`` against the broker: the image's HEALTHCHECK and ``/metrics`` answer from
   inside the image while it runs, it exits 0, leaves a snapshot in the state volume, and
   ``audit`` passes with every message accounted for;
5. nothing was written outside the chart's volumes.

Nothing is skipped: a missing tool, image or broker is a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "infogrowth"
CONFIG_MOUNT = "/etc/infogrowth"
DATA_MOUNT = "/data"
"""Where the test's input files are mounted read-only (like one of the chart's extraVolumes)."""
OUTPUTS = ("accepted", "relabeled", "rejected")
DIM = 32
"""Dimension of the synthetic precomputed vectors in both spaces."""


RUNTIME_COMMANDS = ("audit", "curate", "export", "produce", "run", "seed", "topics")
"""What ``infogrowth --help`` lists in the image; bench, eval, chaos, demo and dev-broker come
with infogrowth-dev, which the image does not hold."""


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


# --------------------------------------------------------------------------- the chart's view


@dataclass
class ChartRun:
    """How the chart runs the `all` workload: what the container gets."""

    image: str
    args: list[str]
    env: dict[str, str]
    mounts: dict[str, bool]
    """Mount path -> read-only."""
    config_yaml: str
    run_as_user: int
    run_as_group: int
    read_only_root: bool
    topics_args: list[str] = field(default_factory=list)


def _env_value(item: dict[str, Any], pod_name: str) -> str | None:
    if "value" in item:
        return str(item["value"])
    ref = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return pod_name if ref == "metadata.name" else None


def chart_run(manifests: str, release: str = "smoke") -> ChartRun:
    """Read the StatefulSet, its ConfigMap and the topics Job out of ``helm template`` output."""
    docs = [d for d in yaml.safe_load_all(manifests) if isinstance(d, dict)]
    sts = [d for d in docs if d.get("kind") == "StatefulSet"]
    if len(sts) != 1:
        raise SmokeFailure(f"expected one StatefulSet in the chart's defaults, found {len(sts)}")
    pod = sts[0]["spec"]["template"]["spec"]
    box = next(c for c in pod["containers"] if c["name"] == "infogrowth")
    pod_name = f"{sts[0]['metadata']['name']}-0"
    env = {}
    for item in box.get("env", []):
        value = _env_value(item, pod_name)
        if value is None:
            raise SmokeFailure(f"chart env {item['name']} has a source this test cannot fill")
        env[item["name"]] = value
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = volumes["config"]["configMap"]["name"]
    maps = [d for d in docs if d.get("kind") == "ConfigMap"]
    data = next(m["data"] for m in maps if m["metadata"]["name"] == config_map)
    jobs = [d for d in docs if d.get("kind") == "Job"]
    topics_args: list[str] = []
    if jobs:
        job_box = jobs[0]["spec"]["template"]["spec"]["containers"][0]
        topics_args = [str(a) for a in job_box.get("args", [])]
    pod_sc, box_sc = pod.get("securityContext", {}), box.get("securityContext", {})
    return ChartRun(
        image=str(box["image"]),
        args=[str(a) for a in box["args"]],
        env=env,
        mounts={m["mountPath"]: bool(m.get("readOnly", False)) for m in box["volumeMounts"]},
        config_yaml=str(data["config.yaml"]),
        run_as_user=int(box_sc.get("runAsUser", pod_sc.get("runAsUser", 0))),
        run_as_group=int(box_sc.get("runAsGroup", pod_sc.get("runAsGroup", 0))),
        read_only_root=bool(box_sc.get("readOnlyRootFilesystem", False)),
        topics_args=topics_args,
    )


def render_chart(helm: str, image: str, bootstrap: str, port: int, run_id: str) -> ChartRun:
    """The chart with its defaults, pointed at ``bootstrap`` with topics of this run only (and
    its topics Job, off by default, which creates them)."""
    repo, _, tag = image.rpartition(":")
    kafka = {
        "topics": {
            role: f"smoke{run_id}.{role}"
            for role in ("ingest", "embedded", "changelog", "control", *OUTPUTS)
        },
        "embed_group": f"smoke{run_id}-embed",
        "select_group": f"smoke{run_id}-select",
        "transactional_id_prefix": f"smoke{run_id}",
    }
    cmd = [helm, "template", "smoke", str(CHART)]
    cmd += ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]
    cmd += ["--set", f"kafka.bootstrapServers={bootstrap}", "--set", f"metrics.port={port}"]
    cmd += ["--set-json", f"config.kafka={json.dumps(kafka)}", "--set", "topics.mode=job"]
    # An unseeded run on precomputed vectors is told their dimensions (encoder.dims).
    dims = {"dims": {"image": DIM, "text": DIM}}
    cmd += ["--set-json", f"config.encoder={json.dumps(dims)}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SmokeFailure(f"helm template failed:\n{res.stderr[-2000:]}")
    return chart_run(res.stdout)


# --------------------------------------------------------------------------- the image's view


def check_image_matches_chart(config: dict[str, Any], chart: ChartRun) -> None:
    """The image's own settings must be what the chart relies on (it sets no command)."""
    cfg = config.get("config") or config.get("Config") or {}
    problems = []
    user = str(cfg.get("User", ""))
    if user != f"{chart.run_as_user}:{chart.run_as_group}":
        problems.append(
            f"USER is {user!r}, the chart runs {chart.run_as_user}:{chart.run_as_group}"
        )
    if cfg.get("Entrypoint") != ["infogrowth"]:
        problems.append(f"ENTRYPOINT is {cfg.get('Entrypoint')!r}, not ['infogrowth']")
    if list(cfg.get("Cmd") or [])[:3] != chart.args[:3]:
        problems.append(f"CMD {cfg.get('Cmd')!r} differs from the chart's args {chart.args[:3]}")
    if cfg.get("WorkingDir") != "/var/lib/infogrowth" or "/var/lib/infogrowth" not in chart.mounts:
        problems.append(f"WORKDIR {cfg.get('WorkingDir')!r} is not the chart's state volume")
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    if env.get("HF_HOME") != chart.env.get("HF_HOME"):
        problems.append(f"HF_HOME {env.get('HF_HOME')!r} != chart's {chart.env.get('HF_HOME')!r}")
    if env.get("HF_HUB_OFFLINE") != "1" or chart.env.get("HF_HUB_OFFLINE") != "1":
        problems.append("HF_HUB_OFFLINE must be 1 in the image and in the chart")
    if not (cfg.get("Healthcheck") or {}).get("Test"):
        problems.append("no HEALTHCHECK in the image config (built with --format oci?)")
    if problems:
        raise SmokeFailure("the image does not match the chart:\n  " + "\n  ".join(problems))


def healthcheck_argv(config: dict[str, Any]) -> list[str]:
    test = list(((config.get("config") or {}).get("Healthcheck") or {}).get("Test") or [])
    if not test or test[0] not in ("CMD", "CMD-SHELL"):
        raise SmokeFailure(f"unusable HEALTHCHECK test {test!r}")
    return test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]


def written_outside(rootfs: Path, since: float, mounts: Sequence[str]) -> list[str]:
    """Paths under ``rootfs`` changed after ``since``, except under the volumes and the kernel's
    file systems (which ``buildah run`` mounts)."""
    skip = {p.strip("/") for p in mounts} | {"proc", "sys", "dev"}
    touched_by_runtime = {"run"}  # `buildah run` itself updates /run's times, not its content
    found = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        rel_dir = os.path.relpath(dirpath, rootfs)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if os.path.join(rel_dir, d) not in skip]
        for name in dirnames + filenames:
            rel = os.path.join(rel_dir, name)
            if rel in skip or rel in touched_by_runtime:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                if max(st.st_mtime, st.st_ctime) > since:
                    found.append("/" + rel)
    return sorted(found)


# --------------------------------------------------------------------------- buildah


class Container:
    """A buildah working container of the image, run as the chart runs it."""

    def __init__(self, image: str, chart: ChartRun, volumes: dict[str, Path]) -> None:
        self.chart = chart
        self.volumes = volumes
        name = f"infogrowth-smoke-{os.getpid()}"
        self.name = _out(["buildah", "from", "--pull=false", "--name", name, image]).strip()
        self.rootfs = Path(_out(["buildah", "mount", self.name]).strip())

    def argv(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        out = ["buildah", "run", "--isolation", "chroot"]
        out += ["--user", f"{self.chart.run_as_user}:{self.chart.run_as_group}"]
        for key, value in {**self.chart.env, **(env or {})}.items():
            out += ["--env", f"{key}={value}"]
        for target, source in self.volumes.items():
            ro = self.chart.mounts.get(target, target == DATA_MOUNT)
            out += ["--volume", f"{source}:{target}:{'ro' if ro else 'rw'}"]
        return [*out, self.name, "--", *cmd]

    def run(
        self, cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(cmd, env), capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as fh:
            return subprocess.Popen(
                self.argv(cmd), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def remove(self) -> None:
        subprocess.run(["buildah", "umount", self.name], capture_output=True, check=False)
        subprocess.run(["buildah", "rm", self.name], capture_output=True, check=False)


def _out(cmd: Sequence[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SmokeFailure(f"`{shlex.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr}")
    return res.stdout


def _expect(res: subprocess.CompletedProcess[str], what: str) -> str:
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
        raise SmokeFailure(f"{what} exited {res.returncode}:\n{tail}")
    return res.stdout


# --------------------------------------------------------------------------- the checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_jsonl(path: Path, rows: list[dict[str, Any]], extra: Sequence[str] = ()) -> int:
    lines = [json.dumps(r) for r in rows] + list(extra)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def samples(n: int, *, seed: int, prefix: str, dup_rate: float = 0.1) -> list[dict[str, Any]]:
    """``n`` labelled samples with precomputed vectors around 8 cluster centres in both spaces;
    about ``dup_rate`` of them are near-copies of an earlier one. The test's own data, so that
    it needs nothing from the tooling (infogrowth-dev) beyond the host's broker."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = {s: rng.normal(size=(8, DIM)) for s in ("image", "text")}
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if rows and rng.random() < dup_rate:
            src = rows[int(rng.integers(len(rows)))]
            emb = {
                s: (np.asarray(v) + rng.normal(scale=1e-4, size=DIM)).tolist()
                for s, v in src["embedding"].items()
            }
            rows.append({"id": f"{prefix}{i:06d}", "embedding": emb, "label": src["label"]})
            continue
        c = int(rng.integers(8))
        emb = {s: (m[c] + rng.normal(scale=0.35, size=DIM)).tolist() for s, m in centres.items()}
        rows.append({"id": f"{prefix}{i:06d}", "embedding": emb, "label": f"c{c}"})
    return rows


def check_curate(box: Container, work: Path) -> str:
    rows = samples(200, seed=181, prefix="c")
    n = _write_jsonl(work / "data" / "curate.jsonl", rows, extra=['{"id": "bad", "v": 1'])
    out = "/tmp/curate"
    _expect(
        box.run(["infogrowth", "curate", "--input", f"{DATA_MOUNT}/curate.jsonl", "--out", out]),
        "infogrowth curate",
    )
    host_out = work / "tmp" / "curate"
    ids: list[str] = []
    for name in OUTPUTS:
        path = host_out / f"{name}.jsonl"
        if not path.is_file():
            raise SmokeFailure(f"curate wrote no {name}.jsonl")
        ids += [json.loads(line)["id"] for line in path.read_text().splitlines() if line]
    want = {r["id"] for r in rows}
    if len(ids) != n or not want <= set(ids):
        raise SmokeFailure(f"curate: {len(ids)} outputs for {n} input lines")
    report = json.loads((host_out / "report.json").read_text())
    accepted = sum(1 for line in (host_out / "accepted.jsonl").read_text().splitlines() if line)
    if accepted == 0:
        raise SmokeFailure(f"curate accepted nothing: {json.dumps(report)[:1000]}")
    return f"{n} lines -> {accepted} accepted, one output each"


def _scrape_inside(box: Container, port: int) -> str:
    code = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', "
        "timeout=4).read().decode())"
    )
    res = box.run(["python", "-c", code], timeout=60)
    return res.stdout if res.returncode == 0 else ""


def _samples_total(metrics: str) -> float:
    """Samples decided, over both stages (the embed stage counts only what it rejects)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("infogrowth_samples_total{")
    )


def check_kafka(box: Container, image_config: dict[str, Any], work: Path, port: int) -> str:
    chart = box.chart
    if not chart.topics_args:
        raise SmokeFailure("the chart renders no topics Job")
    _expect(box.run(["infogrowth", *chart.topics_args]), "topics create (the chart's Job)")
    rows = samples(300, seed=182, prefix="k")
    n = _write_jsonl(work / "data" / "stream.jsonl", rows, extra=["not json"])
    config = f"{CONFIG_MOUNT}/config.yaml"
    _expect(
        box.run(
            ["infogrowth", "produce", "--input", f"{DATA_MOUNT}/stream.jsonl", "--config", config]
        ),
        "infogrowth produce",
    )
    log = work / "run.log"
    proc = box.start(["infogrowth", *chart.args, "--exit-when-idle", "20"], log)
    try:
        _watch(box, proc, healthcheck_argv(image_config), port, n)
        code = proc.wait(timeout=180)
    except (SmokeFailure, subprocess.TimeoutExpired) as exc:
        raise SmokeFailure(f"{exc}\n--- run log ---\n{_tail(log)}") from None
    finally:
        _stop(proc)
    if code != 0:
        raise SmokeFailure(f"run --exit-when-idle exited {code}:\n{_tail(log)}")
    if not list((work / "state").glob("state/*/CURRENT")):
        raise SmokeFailure("run left no snapshot in the state volume")
    audit = _expect(box.run(["infogrowth", "audit", "--config", config, "--json"]), "audit")
    result = json.loads(audit)
    if result.get("ingest") != n:
        raise SmokeFailure(f"audit saw {result.get('ingest')} ingest messages, produced {n}")
    return f"{n} messages, healthz + /metrics answered inside, audit passed"


def _watch(
    box: Container, proc: subprocess.Popen[bytes], health: list[str], port: int, n: int
) -> None:
    """While ``run`` works: the image's HEALTHCHECK passes, then /metrics counts all n samples."""
    deadline = time.monotonic() + 240
    healthy = False
    while not healthy:
        if proc.poll() is not None:
            raise SmokeFailure(f"run exited {proc.returncode} before /healthz answered")
        if time.monotonic() > deadline:
            raise SmokeFailure("the image's HEALTHCHECK never passed within 240 s")
        # The chart sets the port in config.yaml; the HEALTHCHECK reads it from the env.
        healthy = box.run(health, env={"INFOGROWTH_SERVE__PORT": str(port)}).returncode == 0
        time.sleep(0.5)
    seen = 0.0
    while seen < n:
        if proc.poll() is not None:
            raise SmokeFailure(f"run exited {proc.returncode}; /metrics counted {seen:.0f}/{n}")
        if time.monotonic() > deadline:
            raise SmokeFailure(f"/metrics counted {seen:.0f}/{n} samples after 240 s")
        seen = _samples_total(_scrape_inside(box, port))
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- main


def _preflight(image: str) -> tuple[str, dict[str, Any]]:
    if shutil.which("buildah") is None:
        raise SmokeFailure("buildah is not installed: run `make image` first (it installs it)")
    res = subprocess.run(
        ["buildah", "inspect", "--type", "image", image], capture_output=True, text=True
    )
    if res.returncode != 0:
        store = os.environ.get("CONTAINERS_STORAGE_CONF", "the default store")
        raise SmokeFailure(f"image {image} is not in {store}: run `make image` first")
    helm = (
        os.environ.get("HELM")
        or subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-tools.sh"), "--print-helm"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    if not os.access(helm, os.X_OK):
        raise SmokeFailure(f"helm is missing at {helm}: run `make tools`")
    return helm, json.loads(res.stdout)["Docker"]


@contextlib.contextmanager
def _broker() -> Iterator[str]:
    from infogrowth_dev.kafka.broker import broker_for_tests

    with broker_for_tests() as bootstrap:
        yield bootstrap


def _volumes(work: Path, chart: ChartRun) -> dict[str, Path]:
    """Host directories for the chart's mounts, with the permissions Kubernetes gives them."""
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(chart.config_yaml)
    (work / "tmp").mkdir(mode=0o1777)
    os.chmod(work / "tmp", 0o1777)  # an emptyDir is world-writable
    (work / "state").mkdir()
    os.chown(work / "state", chart.run_as_user, chart.run_as_group)  # fsGroup
    (work / "data").mkdir()
    vols = {CONFIG_MOUNT: work / "config", "/tmp": work / "tmp"}
    vols["/var/lib/infogrowth"] = work / "state"
    unknown = set(chart.mounts) - set(vols)
    if unknown:
        raise SmokeFailure(f"the chart mounts {sorted(unknown)}, which this test does not provide")
    return {**vols, DATA_MOUNT: work / "data"}


def smoke(image: str, work: Path) -> None:
    helm, image_config = _preflight(image)
    t_all = time.monotonic()

    def step(name: str, fn: Any, *args: Any) -> None:
        t0 = time.monotonic()
        try:
            detail = fn(*args)
        except SmokeFailure as exc:
            raise SmokeFailure(f"{name}: {exc}") from None
        print(f"ok    {name}: {detail or ''} ({time.monotonic() - t0:.0f} s)", flush=True)

    with _broker() as bootstrap:
        port = _free_port()
        chart = render_chart(helm, image, bootstrap, port, uuid.uuid4().hex[:8])
        if not chart.read_only_root:
            raise SmokeFailure("the chart's defaults no longer set readOnlyRootFilesystem")
        step("image config == chart", check_image_matches_chart, image_config, chart)
        box = Container(image, chart, _volumes(work, chart))
        try:
            _expect(box.run(["true"]), "a first `buildah run`")  # creates the mount points
            since = time.time()
            time.sleep(1.1)
            step("infogrowth --help", lambda: _help(box))
            step("infogrowth curate", check_curate, box, work)
            step("infogrowth run/audit", check_kafka, box, image_config, work, port)
            changed = written_outside(box.rootfs, since, [*chart.mounts, DATA_MOUNT])
            if changed:
                raise SmokeFailure(
                    "read-only root: the image wrote outside the chart's volumes: "
                    + ", ".join(changed[:20])
                )
            print("ok    root file system untouched (writes only to the chart's volumes)")
        finally:
            box.remove()
    print(f"test-image: {image} passed in {time.monotonic() - t_all:.0f} s")


def listed_commands(help_text: str) -> list[str]:
    """The subcommand names in click's ``--help`` output (its ``Commands:`` section)."""
    lines = help_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Commands:") + 1
    except StopIteration:
        return []
    names = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("  "):
            break
        if line.startswith("  ") and not line.startswith("   ") and line.split():
            names.append(line.split()[0])
    return names


def check_runtime_commands(help_text: str) -> list[str]:
    """The image lists exactly the runtime commands: no tooling (infogrowth-dev) in it."""
    names = listed_commands(help_text)
    if set(names) != set(RUNTIME_COMMANDS):
        extra = sorted(set(names) - set(RUNTIME_COMMANDS))
        missing = sorted(set(RUNTIME_COMMANDS) - set(names))
        raise SmokeFailure(
            f"`infogrowth --help` lists {names}: not in the image's set {extra}, missing {missing}"
        )
    return names


def _help(box: Container) -> str:
    out = _expect(box.run(["infogrowth", "--help"]), "infogrowth --help")
    for cmd in check_runtime_commands(out):
        _expect(box.run(["infogrowth", cmd, "--help"]), f"infogrowth {cmd} --help")
    version = _expect(box.run(["infogrowth", "--version"]), "infogrowth --version").strip()
    return version


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=os.environ.get("IMAGE", ""), required=False)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if not args.image:
        print("test-image: FAIL: no image named (--image or IMAGE)", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("test-image: FAIL: buildah run needs root here (chroot isolation)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="infogrowth-smoke-"))
    os.chmod(work, 0o755)
    try:
        smoke(args.image, work)
    except SmokeFailure as exc:
        print(f"test-image: FAIL: {exc}", file=sys.stderr)
        if any(work.iterdir()):
            print(f"test-image: files kept in {work}", file=sys.stderr)
        else:
            work.rmdir()
        return 1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
