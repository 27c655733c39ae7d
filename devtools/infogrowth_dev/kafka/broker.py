"""A real single-node Apache Kafka 4.x broker (KRaft) for development and tests.

Kafka's jars come from Maven Central (resolved once with ``mvn`` into a cache directory); the
broker runs as a plain ``java`` subprocess with combined broker+controller roles on free loopback
ports. Nothing here mocks Kafka: clients talk to the real broker over TCP.

Entry points:

* :class:`LocalBroker`: start/stop/kill/restart/freeze one broker, keeping its port and data.
* :func:`start_detached` / :func:`stop_detached` / :func:`detached_status`: a broker that outlives
  the calling process (``infogrowth dev-broker``), tracked through a JSON state file.
* :func:`bootstrap_for_tests` / :func:`broker_for_tests`: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else
  an ``apache/kafka`` testcontainer when Docker answers, else a :class:`LocalBroker`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "BrokerError",
    "LocalBroker",
    "bootstrap_for_tests",
    "broker_for_tests",
    "detached_status",
    "resolve_kafka_classpath",
    "start_detached",
    "stop_detached",
    "wait_for_broker",
]

DEFAULT_KAFKA_VERSION = "4.1.1"
"""Kafka release used by default (verified end to end with this module)."""

FALLBACK_LOG4J_VERSION = "2.24.3"
"""log4j2 version used when Kafka's pom brings no log4j-api (4.0.x). Kafka's poms carry slf4j-api
but never the slf4j->log4j2 binding, so one is added at the log4j version Kafka uses."""

DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
CACHE_ENV = "INFOGROWTH_CACHE_DIR"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
IMAGE_ENV = "INFOGROWTH_KAFKA_IMAGE"
STATE_FILE = "dev-broker.json"

_LOG = logging.getLogger(__name__)
_MARKER = "resolved.json"
_MAIN_CLASS = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"
_READY_TXN_ID = "infogrowth-broker-readiness"
_PORTS_FILE = "ports.json"

_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by infogrowth_dev.kafka.broker: broker logs go to files, stdout stays quiet. -->
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <RollingFile name="server" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="64 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.log.LogCleaner" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
  </Loggers>
</Configuration>
"""

_JVM_OPTS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


class BrokerError(RuntimeError):
    """The broker (or its classpath) could not be prepared, started or reached."""


# --------------------------------------------------------------------------- classpath


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "infogrowth"


def _pom(name: str, deps: Sequence[tuple[str, str, str]]) -> str:
    body = "".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>\n"
        for g, a, v in deps
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>infogrowth.local</groupId>
  <artifactId>{name}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{body}  </dependencies>
</project>
"""


def _jar_version(jars: Sequence[str], artifact: str) -> str | None:
    match = (re.fullmatch(rf"{re.escape(artifact)}-(\d[^/]*)\.jar", j) for j in jars)
    return next((m.group(1) for m in match if m), None)


def _logging_deps(jars: Sequence[str]) -> list[tuple[str, str, str]]:
    """log4j2 api/core plus the slf4j binding, aligned with the log4j/slf4j Kafka brings."""
    log4j = _jar_version(jars, "log4j-api") or FALLBACK_LOG4J_VERSION
    slf4j = _jar_version(jars, "slf4j-api") or "1.7"
    binding = "log4j-slf4j-impl" if slf4j.startswith("1.") else "log4j-slf4j2-impl"
    group = "org.apache.logging.log4j"
    return [(group, "log4j-api", log4j), (group, "log4j-core", log4j), (group, binding, log4j)]


def _mvn_copy(mvn: str, pom: Path, out: Path, *flags: str) -> None:
    cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom)]
    cmd += [f"{DEPENDENCY_PLUGIN}:copy-dependencies", f"-DoutputDirectory={out}", *flags]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"Maven did not finish within 900 s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        tail = _tail_text((proc.stdout or "") + (proc.stderr or ""), 40)
        raise BrokerError(f"Maven failed (exit {proc.returncode}) for {pom}:\n{tail}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_classpath(root: Path, version: str) -> list[Path] | None:
    try:
        marker = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != version:
        return None
    jars = [root / "libs" / str(name) for name in marker.get("jars", [])]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return jars


def resolve_kafka_classpath(
    version: str = DEFAULT_KAFKA_VERSION, cache_dir: Path | None = None
) -> list[Path]:
    """Return the jars that run ``kafka_2.13:<version>``, fetching them with Maven if not cached.

    The jars land in ``<cache>/kafka-<version>/libs`` (cache: ``cache_dir``, else
    ``$INFOGROWTH_CACHE_DIR``, else ``~/.cache/infogrowth``). A marker file is written only after
    a complete resolve, so later calls neither touch the network nor run Maven.
    """
    root = _cache_root(cache_dir) / f"kafka-{version}"
    cached = _cached_classpath(root, version)
    if cached is not None:
        return cached
    with _file_lock(root / ".resolve.lock"):
        cached = _cached_classpath(root, version)
        if cached is not None:
            return cached
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven ('mvn') is not on PATH; it is needed once to fetch Kafka jars")
        (root / _MARKER).unlink(missing_ok=True)
        staging = root / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        _LOG.info("resolving Kafka %s from Maven into %s", version, root)
        try:
            kafka_pom = root / "pom-kafka.xml"
            kafka_pom.write_text(
                _pom("kafka-runtime", [("org.apache.kafka", "kafka_2.13", version)])
            )
            _mvn_copy(mvn, kafka_pom, staging, "-DincludeScope=runtime")
            jars = sorted(p.name for p in staging.glob("*.jar"))
            if f"kafka_2.13-{version}.jar" not in jars:
                raise BrokerError(f"Maven did not fetch kafka_2.13-{version}.jar")
            # Second pass: the slf4j->log4j2 binding Kafka's pom lacks, at Kafka's log4j version.
            logging_pom = root / "pom-logging.xml"
            logging_pom.write_text(_pom("kafka-logging", _logging_deps(jars)))
            _mvn_copy(mvn, logging_pom, staging, "-DincludeScope=runtime", "-DexcludeTransitive")
            jars = sorted(p.name for p in staging.glob("*.jar"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        libs = root / "libs"
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker = {"version": version, "jars": jars, "resolved_at": time.time()}
        tmp_marker = root / f"{_MARKER}.tmp"
        tmp_marker.write_text(json.dumps(marker, indent=1))
        tmp_marker.replace(root / _MARKER)
        return [libs / name for name in jars]


# --------------------------------------------------------------------------- helpers


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail_text(fh.read().decode("utf-8", "replace"), lines)
    except OSError:
        return "(no log)"


def _error_lines(path: Path, limit: int = 5) -> str:
    """The first ``limit`` ERROR/FATAL lines of ``server.log``, each with its exception line."""
    found: list[str] = []
    after_error = False
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if after_error and not line.startswith(("[", "\t")):
                    found.append("    " + line.strip()[:500])  # the exception's message
                after_error = False
                if len(found) >= 2 * limit:
                    break
                if "] ERROR " in line or "] FATAL " in line:
                    found.append(line.rstrip()[:500])
                    after_error = True
    except OSError:
        pass
    return "\n".join(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("no 'java' on PATH (and JAVA_HOME unset); Kafka 4.x needs Java 17+")
    return java


def _random_cluster_id() -> str:
    """A Kafka-style cluster id (base64url UUID); never starts with '-' (CLI-safe)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _proc_alive(pid: int) -> bool:
    """True while ``pid`` runs (or is still exiting); our own child is reaped once it is done."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
        child = True
    except ChildProcessError:
        child = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if child:
        return True  # a finished child is reaped by waitpid above, never left as a zombie
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return _pid_exists(pid)
    # A JVM's main thread may exit (state Z) while its other threads still shut down.
    return state != "Z" or threads > 1


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_broker(pid: int, work_dir: Path) -> bool:
    """Guard against pid reuse: the process must be a Kafka JVM using ``work_dir``."""
    if not _proc_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return True
    return _MAIN_CLASS in cmdline and str(work_dir) in cmdline


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _terminate_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL it if still alive after ``timeout_s``."""
    _signal_group(pid, signal.SIGTERM)
    _signal_group(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout_s
    while _proc_alive(pid):
        if time.monotonic() > deadline:
            _signal_group(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10
            while _proc_alive(pid) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
            return
        time.sleep(0.05)


def _kill_popen(holder: list[subprocess.Popen[bytes]]) -> None:
    """Finalizer: make sure no broker JVM outlives the Python object (or interpreter)."""
    for proc in holder:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    holder.clear()


def wait_for_broker(
    bootstrap: str,
    timeout_s: float = 60.0,
    *,
    transactions: bool = True,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Block until ``bootstrap`` serves metadata and (optionally) the transaction coordinator.

    ``alive`` is polled between attempts; when it returns False the wait stops early.
    Raises :class:`BrokerError` on timeout.
    """
    from confluent_kafka import KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout_s
    base: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _LOG}
    last_error = "no attempt made"

    def remaining() -> float:
        return deadline - time.monotonic()

    def check_alive() -> None:
        if alive is not None and not alive():
            raise BrokerError(f"broker process exited while waiting for it ({last_error})")

    # Metadata first: the broker must list itself.
    admin = AdminClient(dict(base))
    while True:
        check_alive()
        try:
            md = admin.list_topics(timeout=max(0.5, min(5.0, remaining())))
            if md.brokers:
                break
            last_error = "metadata lists no brokers"
        except KafkaException as exc:
            last_error = str(exc)
        if remaining() <= 0:
            raise BrokerError(f"broker at {bootstrap} did not serve metadata: {last_error}")
        time.sleep(0.2)
    if not transactions:
        return
    # Then transactions: InitProducerId needs __transaction_state created and loaded.
    while True:
        check_alive()
        producer = Producer(
            {
                **base,
                "transactional.id": _READY_TXN_ID,
                "transaction.timeout.ms": 10_000,
                "socket.connection.setup.timeout.ms": 5_000,
            }
        )
        try:
            producer.init_transactions(max(1.0, min(15.0, remaining())))
            return
        except KafkaException as exc:
            last_error = str(exc)
        finally:
            del producer
        if remaining() <= 0:
            raise BrokerError(f"transaction coordinator at {bootstrap} not ready: {last_error}")
        time.sleep(0.3)


# --------------------------------------------------------------------------- LocalBroker


class LocalBroker:
    """One real Kafka 4.x node (KRaft, ``process.roles=broker,controller``, ``node.id=1`` unless
    it is one node of a cluster).

    Ports and the data directory stay fixed for the object's lifetime, so :meth:`stop`/:meth:`kill`
    followed by :meth:`start` (or :meth:`restart`) brings the same broker back with its data.
    Used as a context manager it starts on enter and stops (removing a temporary work dir) on exit.
    Unless ``detached``, the JVM runs in its own process group and is killed when this object is
    collected, at interpreter exit, and (via ``setpriv --pdeathsig``) if this process is killed.
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        version: str = DEFAULT_KAFKA_VERSION,
        port: int | None = None,
        controller_port: int | None = None,
        extra_config: Mapping[str, str | int] | None = None,
        jvm_opts: Sequence[str] = _JVM_OPTS,
        cache_dir: Path | None = None,
        detached: bool = False,
        node_id: int = 1,
        quorum_voters: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        """Configure a broker; nothing runs until :meth:`start`.

        ``work_dir`` defaults to a fresh temporary directory removed by :meth:`close`; a work dir
        used before keeps its data and, when both are free and none are given, its ports.
        ``detached`` starts the JVM in its own session and does not kill it when this object
        or the interpreter goes away (used by :func:`start_detached`).
        ``node_id``, ``quorum_voters`` (``controller.quorum.voters``; default: this node alone)
        and ``cluster_id`` (used when formatting the storage) make it one node of a cluster
        (see :class:`infogrowth_dev.kafka.cluster.LocalCluster`).
        """
        self._owns_work_dir = work_dir is None
        self.work_dir = Path(
            tempfile.mkdtemp(prefix="infogrowth-kafka-") if work_dir is None else work_dir
        ).resolve()
        self.version = version
        self._auto_ports = port is None and controller_port is None
        if self._auto_ports:
            port, controller_port = self._previous_ports()
        self.port = port if port is not None else _free_port()
        self.controller_port = controller_port if controller_port is not None else _free_port()
        while self.controller_port == self.port:
            self.controller_port = _free_port()
        self.extra_config = {k: str(v) for k, v in (extra_config or {}).items()}
        self.jvm_opts = list(jvm_opts)
        self.cache_dir = cache_dir
        self.detached = detached
        self.node_id = node_id
        self.quorum_voters = quorum_voters
        self.cluster_id = cluster_id
        self.startup_s: float | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._frozen = False
        if not detached:
            self._finalizer = weakref.finalize(self, _kill_popen, self._procs)

    def _previous_ports(self) -> tuple[int | None, int | None]:
        """Ports this work dir used before, if both are free again (same bootstrap as before)."""
        try:
            saved = json.loads((self.work_dir / _PORTS_FILE).read_text())
            port, cport = int(saved["port"]), int(saved["controller_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
        if port != cport and _port_free(port) and _port_free(cport):
            return port, cport
        return None, None

    # -- paths and properties

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>`` of the PLAINTEXT listener."""
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        """``log.dirs`` (also the KRaft metadata log)."""
        return self.work_dir / "data"

    @property
    def logs_dir(self) -> Path:
        """Where ``server.log`` (log4j2) and ``stdout.log`` (JVM stdout/stderr) go."""
        return self.work_dir / "logs"

    @property
    def log_path(self) -> Path:
        """The broker's main log file."""
        return self.logs_dir / "server.log"

    @property
    def properties_path(self) -> Path:
        """The generated ``server.properties``."""
        return self.work_dir / "server.properties"

    @property
    def pid(self) -> int | None:
        """Pid of the running JVM, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        """True while the JVM process exists (it may still be starting, or be frozen)."""
        return self.pid is not None

    @property
    def _proc(self) -> subprocess.Popen[bytes] | None:
        return self._procs[0] if self._procs else None

    def config(self) -> dict[str, str]:
        """The ``server.properties`` entries this broker runs with."""
        listeners = (
            f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.quorum_voters
            or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": listeners,
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "delete.topic.enable": "true",
            # After a crash the restarted controller rejects the new broker incarnation
            # (DUPLICATE_BROKER_REGISTRATION) until the old session expires: 9 s by default.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4000",
        }
        props.update(self.extra_config)
        return props

    def log_tail(self, lines: int = 40) -> str:
        """First ERROR lines and last ``lines`` lines of ``server.log``, then the JVM's stdout."""
        errors = _error_lines(self.log_path)
        out = _tail_file(self.logs_dir / "stdout.log", lines)
        head = f"--- first errors ---\n{errors}\n" if errors else ""
        return (
            f"{head}--- server.log ---\n{_tail_file(self.log_path, lines)}\n--- stdout ---\n{out}"
        )

    # -- lifecycle

    def _write_files(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{k}={v}\n" for k, v in self.config().items())
        self.properties_path.write_text("# written by infogrowth_dev.kafka.broker\n" + body)
        (self.work_dir / "log4j2.xml").write_text(_LOG4J2_XML)
        ports = {"port": self.port, "controller_port": self.controller_port}
        (self.work_dir / _PORTS_FILE).write_text(json.dumps(ports))

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        jars = resolve_kafka_classpath(self.version, self.cache_dir)
        dirs = {jar.parent for jar in jars}
        # One directory holding exactly these jars: a wildcard keeps `ps` output readable.
        classpath = (
            str(dirs.pop() / "*") if len(dirs) == 1 else os.pathsep.join(str(jar) for jar in jars)
        )
        return [
            _java(),
            *self.jvm_opts,
            f"-Dlog4j2.configurationFile={self.work_dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format_storage(self) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return
        cmd = self._java_cmd(
            _STORAGE_TOOL,
            "format",
            "-t",
            self.cluster_id or _random_cluster_id(),
            "-c",
            str(self.properties_path),
        )
        # The storage tool's own logging is irrelevant; only its exit status matters.
        cmd = [c for c in cmd if not c.startswith("-Dlog4j2.configurationFile=")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise BrokerError(
                f"kafka-storage format failed (exit {proc.returncode}):\n"
                f"{_tail_text(proc.stdout + proc.stderr, 40)}"
            )

    def _launch(self) -> subprocess.Popen[bytes]:
        cmd = self._java_cmd(_MAIN_CLASS, str(self.properties_path))
        setpriv = shutil.which("setpriv")
        if not self.detached and setpriv and threading.current_thread() is threading.main_thread():
            # SIGKILL the JVM if this process dies without cleaning up (e.g. killed by a timeout).
            # Only from the main thread: the signal follows the thread that started the child.
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        with (self.logs_dir / "stdout.log").open("ab") as out:
            out.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            out.flush()
            kwargs: dict[str, Any] = (
                {"start_new_session": True} if self.detached else {"process_group": 0}
            )
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                close_fds=True,
                **kwargs,
            )

    def launch(self) -> None:
        """Start the JVM (formatting the storage on first use) without waiting for it: a
        cluster node cannot serve until a majority of its controller quorum runs."""
        if self.is_running:
            return
        resolve_kafka_classpath(self.version, self.cache_dir)
        self._write_files()
        self._format_storage()
        self._procs[:] = [self._launch()]
        self._frozen = False

    def start(self, timeout_s: float = 90.0) -> LocalBroker:
        """Start (or restart) the broker and wait until clients and transactions work.

        Formats the storage on first use only, so a restart keeps all data. Raises
        :class:`BrokerError` with the tail of the broker log if it is not ready in time.
        """
        if self.is_running:
            return self
        t0 = time.monotonic()
        resolve_kafka_classpath(self.version, self.cache_dir)  # may take a while, once
        first_start = not (self.data_dir / "meta.properties").is_file()
        for attempt in range(3):
            self.launch()
            try:
                self._wait_ready(timeout_s - (time.monotonic() - t0))
            except BrokerError:
                port_clash = "Address already in use" in _error_lines(self.log_path, 50)
                self._hard_stop()
                if port_clash and self._auto_ports and first_start and attempt < 2:
                    _LOG.warning("port clash on %s, retrying on new ports", self.bootstrap_servers)
                    self.port, self.controller_port = _free_port(), _free_port()
                    continue
                raise
            break
        self.startup_s = time.monotonic() - t0
        _LOG.info(
            "Kafka %s ready at %s in %.1f s", self.version, self.bootstrap_servers, self.startup_s
        )
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + max(timeout_s, 1.0)
        proc = self._proc
        assert proc is not None

        def alive() -> bool:
            return proc.poll() is None

        try:
            while not _port_open(self.port):
                if not alive():
                    raise BrokerError("broker process exited during startup")
                if time.monotonic() > deadline:
                    raise BrokerError(f"port {self.port} never opened")
                time.sleep(0.1)
            wait_for_broker(
                self.bootstrap_servers, deadline - time.monotonic(), transactions=True, alive=alive
            )
        except BrokerError as exc:
            raise BrokerError(
                f"Kafka {self.version} at {self.bootstrap_servers} did not come up "
                f"(work dir {self.work_dir}, exit code {proc.poll()}): {exc}\n{self.log_tail()}"
            ) from exc

    def _hard_stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self._frozen = False

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown: SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a frozen JVM must run to handle SIGTERM
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _LOG.warning("broker %s ignored SIGTERM for %.0f s; killing", proc.pid, timeout_s)
            self._hard_stop()
        self._frozen = False

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no clean shutdown); :meth:`start` recovers the same data."""
        self._hard_stop()

    def restart(
        self, downtime_s: float = 0.0, *, graceful: bool = True, timeout_s: float = 90.0
    ) -> LocalBroker:
        """Stop (or kill) the broker, stay down ``downtime_s`` seconds, start it again."""
        if graceful:
            self.stop()
        else:
            self.kill()
        if downtime_s > 0:
            time.sleep(downtime_s)
        return self.start(timeout_s)

    def freeze(self) -> None:
        """SIGSTOP the JVM: connections stay open but nothing answers (a hung broker)."""
        pid = self.pid
        if pid is None:
            raise BrokerError("cannot freeze a broker that is not running")
        _signal_group(pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT a broker frozen by :meth:`freeze`."""
        pid = self.pid
        if pid is not None:
            _signal_group(pid, signal.SIGCONT)
        self._frozen = False

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return self._frozen and self.is_running

    def close(self) -> None:
        """Stop the broker and remove the work dir if it was a temporary one."""
        self.stop()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"LocalBroker({self.bootstrap_servers}, {state}, work_dir={self.work_dir})"


# --------------------------------------------------------------------------- detached mode


def _state_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / STATE_FILE


def _read_state(state_dir: Path | str) -> dict[str, Any] | None:
    try:
        state = json.loads(_state_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _state_alive(state: Mapping[str, Any]) -> bool:
    try:
        return _is_our_broker(int(state["pid"]), Path(str(state["work_dir"])))
    except (KeyError, TypeError, ValueError):
        return False


def start_detached(
    state_dir: Path | str,
    *,
    timeout_s: float = 120.0,
    version: str = DEFAULT_KAFKA_VERSION,
    cache_dir: Path | None = None,
) -> str:
    """Start a broker that outlives this process and return its bootstrap servers.

    Data lives in ``<state_dir>/kafka`` and survives :func:`stop_detached`; the pid, ports and
    paths go to ``<state_dir>/dev-broker.json``. Idempotent: if a live broker is recorded there,
    its bootstrap is returned and nothing is started. A restart reuses the recorded port if free.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(state_dir / ".dev-broker.lock"):
        old = _read_state(state_dir)
        if old is not None and _state_alive(old):
            return str(old["bootstrap"])
        # The work dir remembers its ports, so a restart keeps the bootstrap when they are free.
        broker = LocalBroker(
            state_dir / "kafka", version=version, cache_dir=cache_dir, detached=True
        )
        broker.start(timeout_s)
        state = {
            "pid": broker.pid,
            "port": broker.port,
            "controller_port": broker.controller_port,
            "bootstrap": broker.bootstrap_servers,
            "work_dir": str(broker.work_dir),
            "log": str(broker.log_path),
            "version": version,
            "started_at": time.time(),
        }
        tmp = state_dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(_state_path(state_dir))
        return broker.bootstrap_servers


def detached_status(state_dir: Path | str) -> dict[str, Any] | None:
    """The recorded state of a live detached broker (plus ``reachable``), or None if none runs."""
    state = _read_state(state_dir)
    if state is None or not _state_alive(state):
        return None
    return {**state, "reachable": _port_open(int(state["port"]))}


def stop_detached(state_dir: Path | str, *, timeout_s: float = 30.0, purge: bool = False) -> bool:
    """Stop the detached broker; True if a live one was stopped. ``purge`` also deletes its data."""
    state_dir = Path(state_dir).resolve()
    with _file_lock(state_dir / ".dev-broker.lock"):
        state = _read_state(state_dir)
        stopped = False
        if state is not None and _state_alive(state):
            _terminate_pid(int(state["pid"]), timeout_s)
            stopped = True
        _state_path(state_dir).unlink(missing_ok=True)
        if purge:
            shutil.rmtree(state_dir / "kafka", ignore_errors=True)
        return stopped


# --------------------------------------------------------------------------- tests


def _docker_available() -> bool:
    """True if ``testcontainers`` is importable and a Docker daemon answers a ping."""
    if importlib.util.find_spec("testcontainers") is None:
        return False
    try:
        docker = importlib.import_module("docker")  # a testcontainers dependency
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to reach the daemon means "no Docker"
        return False


def _start_container(timeout_s: float) -> tuple[str, Callable[[], None]]:
    """Run ``apache/kafka`` (single KRaft node) with the host-mapped port advertised."""
    import io
    import tarfile

    docker_container = importlib.import_module("testcontainers.core.container").DockerContainer

    image = os.environ.get(IMAGE_ENV, f"apache/kafka:{DEFAULT_KAFKA_VERSION}")
    script, ready = "/tmp/infogrowth_start.sh", "/tmp/infogrowth_start.ready"
    env = {
        "CLUSTER_ID": _random_cluster_id(),
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,BROKER://:9093,CONTROLLER://:9094",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
            "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9094",
        "KAFKA_NUM_PARTITIONS": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }
    container = docker_container(image).with_exposed_ports(9092)
    for key, value in env.items():
        container = container.with_env(key, value)
    # The advertised listener needs the host-mapped port, known only once the container runs:
    # the entrypoint waits for a starter script that we copy in after start.
    container = container.with_command(
        ["sh", "-c", f"while [ ! -f {ready} ]; do sleep 0.1; done; exec sh {script}"]
    )
    container.start()
    try:
        host = container.get_container_host_ip()
        bootstrap = f"{host}:{container.get_exposed_port(9092)}"
        body = (
            "#!/bin/sh\n"
            f"export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://{bootstrap},BROKER://$(hostname):9093\n"
            "exec /etc/kafka/docker/run\n"
        ).encode()
        for path, data in ((script, body), (ready, b"")):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
                tar.addfile(info, io.BytesIO(data))
            container.get_wrapped_container().put_archive("/", buf.getvalue())
        wait_for_broker(bootstrap, timeout_s, transactions=True)
    except BaseException:
        container.stop()
        raise
    return bootstrap, container.stop


def bootstrap_for_tests(timeout_s: float = 120.0) -> tuple[str, Callable[[], None]]:
    """A reachable broker for tests: ``(bootstrap_servers, cleanup)``.

    Order: ``$KAFKA_BOOTSTRAP_SERVERS`` (checked, no cleanup); an ``apache/kafka`` testcontainer
    when ``testcontainers`` is installed and Docker answers; else a :class:`LocalBroker`.
    Every failure raises; nothing is skipped.
    """
    env = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if env:
        wait_for_broker(env, timeout_s, transactions=True)
        return env, lambda: None
    if _docker_available():
        return _start_container(timeout_s)
    broker = LocalBroker()
    try:
        broker.start(timeout_s)
    except BaseException:
        broker.close()
        raise
    return broker.bootstrap_servers, broker.close


@contextlib.contextmanager
def broker_for_tests(timeout_s: float = 120.0) -> Iterator[str]:
    """Context-manager form of :func:`bootstrap_for_tests`, yielding the bootstrap servers."""
    bootstrap, cleanup = bootstrap_for_tests(timeout_s)
    try:
        yield bootstrap
    finally:
        cleanup()
