"""Security holes of issue 13: image paths confined to a root, secrets redacted wherever settings
are printed, /healthz without exception text, a bounded metrics HTTP server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from infogrowth.cli import main
from infogrowth.config import LimitsConfig
from infogrowth.files import read_inputs, read_jsonl
from infogrowth.schema import Malformed, Sample
from tests.fixtures.data import read_jsonl as read_records
from tests.fixtures.data import write_jsonl
from tests.fixtures.models import make_jpeg

pytestmark = pytest.mark.timeout(60)

LIMITS = LimitsConfig()
JPEG = make_jpeg(24, 16, seed=3)


# ---- image paths ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``data/`` (the input's folder, one good image) next to ``outside/`` (a valid JPEG that
    must never be read through a JSONL line); HOME points at ``home/`` holding another."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "ok.jpg").write_bytes(JPEG)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(JPEG)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "h.jpg").write_bytes(JPEG)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "outside")  # nor through the working directory
    return tmp_path


def _one(tree: Path, image: str, **kw: Any) -> Sample | Malformed:
    path = write_jsonl(tree / "data" / "in.jsonl", [{"id": "x", "text": "t", "image": image}])
    items = list(read_jsonl(path, kw.pop("limits", LIMITS), **kw))
    assert len(items) == 1
    return items[0]


@pytest.mark.parametrize(
    "image",
    [
        "../outside/secret.jpg",
        "imgs/../../outside/secret.jpg",
        "~/h.jpg",
        "secret.jpg",  # relative to the working directory
        "ABSOLUTE",
    ],
)
def test_paths_out_of_the_input_folder_are_malformed(tree: Path, image: str) -> None:
    if image == "ABSOLUTE":
        image = str(tree / "outside" / "secret.jpg")
    item = _one(tree, image)
    assert isinstance(item, Malformed), image
    assert item.detail.startswith("image:")
    assert "image root" in item.detail or "neither" in item.detail, item.detail
    assert item.id == "x"


def test_system_files_never_load(tree: Path) -> None:
    for image in ("/proc/self/environ", "/etc/passwd", "../../../../../../../../etc/passwd"):
        item = _one(tree, image)
        assert isinstance(item, Malformed), image
        assert "image root" in item.detail, item.detail


def test_symlink_out_of_the_root_is_refused_inside_is_fine(tree: Path) -> None:
    (tree / "data" / "escape.jpg").symlink_to(tree / "outside" / "secret.jpg")
    (tree / "data" / "dirlink").symlink_to(tree / "outside", target_is_directory=True)
    (tree / "data" / "alias.jpg").symlink_to(tree / "data" / "imgs" / "ok.jpg")
    for image in ("escape.jpg", "dirlink/secret.jpg"):
        item = _one(tree, image)
        assert isinstance(item, Malformed), image
        assert "outside the image root" in item.detail
    for image in ("alias.jpg", "imgs/ok.jpg", str(tree / "data" / "imgs" / "ok.jpg")):
        item = _one(tree, image)
        assert isinstance(item, Sample) and item.image == JPEG, image


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files_are_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "data" / "pipe.jpg")  # a read would block forever
    item = _one(tree, "pipe.jpg")
    assert isinstance(item, Malformed) and "not a regular file" in item.detail
    (tree / "data" / "dir.jpg").mkdir()
    item = _one(tree, "dir.jpg")
    assert isinstance(item, Malformed) and "not a regular file" in item.detail


def test_image_files_are_bounded_by_limits(tree: Path) -> None:
    small = LimitsConfig(max_image_bytes=len(JPEG) - 1)
    item = _one(tree, "imgs/ok.jpg", limits=small)
    assert isinstance(item, Malformed) and "over the limit" in item.detail
    assert isinstance(_one(tree, "imgs/ok.jpg"), Sample)


def test_explicit_image_root(tree: Path) -> None:
    """``image_root`` widens (or narrows) the root; relative paths still start at the file."""
    item = _one(tree, "../outside/secret.jpg", image_root=tree)
    assert isinstance(item, Sample) and item.image == JPEG
    item = _one(tree, "imgs/ok.jpg", image_root=tree / "outside")
    assert isinstance(item, Malformed) and "outside the image root" in item.detail
    path = tree / "data" / "in.jsonl"
    assert all(isinstance(it, Sample) for it in read_inputs([path], LIMITS, image_root=tree))


def test_curate_turns_refused_paths_into_one_malformed_record_each(tree: Path) -> None:
    rows = [
        {"id": "good", "text": "a cat", "embedding": {"text": [1.0, 0.0, 0.0]}},
        {"id": "abs", "text": "t", "image": str(tree / "outside" / "secret.jpg")},
        {"id": "up", "text": "t", "image": "../outside/secret.jpg"},
        {"id": "env", "text": "t", "image": "/proc/self/environ"},
    ]
    inp = write_jsonl(tree / "data" / "in.jsonl", rows)
    out = tree / "out"
    args = ["curate", "--input", str(inp), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rejected = {r["id"]: r for r in read_records(out / "rejected.jsonl")}
    assert set(rejected) == {"abs", "up", "env"}
    for r in rejected.values():
        assert r["reason"] == "malformed"
        assert "image root" in r["detail"]
    # --image-root one level up lets ../outside in
    res = CliRunner().invoke(main, [*args[:-1], "--image-root", str(tree), "--no-progress"])
    assert res.exit_code == 0, res.output
    rejected = {r["id"]: r for r in read_records(out / "rejected.jsonl")}
    assert "up" not in rejected or "image root" not in rejected["up"]["detail"]
    assert "image root" in rejected["env"]["detail"]


def test_produce_never_ships_files_out_of_the_root(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``produce`` sends the refused line as it is (the curator rejects it): never the bytes."""
    import infogrowth.kafka.tools as tools
    from tests.fixtures.helpers import make_settings

    secret = b"TOP-SECRET-BYTES"
    (tree / "outside" / "secret.jpg").write_bytes(secret)
    sent: list[bytes] = []

    class FakeProducer:
        def __init__(self, conf: dict[str, Any]) -> None:
            pass

        def produce(
            self,
            topic: str,
            value: bytes,
            key: bytes | None,
            on_delivery: Any,
            headers: Any = None,
        ) -> None:
            sent.append(value)

        def poll(self, timeout: float) -> int:
            return 0

        def flush(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(tools, "Producer", FakeProducer)
    rows = [
        {"id": "abs", "text": "t", "image": str(tree / "outside" / "secret.jpg")},
        {"id": "up", "text": "t", "image": "../outside/secret.jpg"},
    ]
    inp = write_jsonl(tree / "data" / "in.jsonl", rows)
    assert tools.produce(make_settings(), [inp], "t") == 2
    assert len(sent) == 2 and not any(secret in v for v in sent)
    sent.clear()
    assert tools.produce(make_settings(), [inp], "t", image_root=tree) == 2
    assert all(secret in v for v in sent)  # an explicit root lets them in


def test_produce_cli_has_image_root() -> None:
    res = CliRunner().invoke(main, ["produce", "--help"])
    assert "--image-root" in res.output
    res = CliRunner().invoke(main, ["curate", "--help"])
    assert "--image-root" in res.output


# ---- secrets in settings -------------------------------------------------------------------

SECRET = "s3cr3t-Pa55-do-not-leak"
SECRET_CLIENT = {
    "sasl.password": SECRET + "-pw",
    "SASL.PASSWORD": SECRET + "-upper",
    "sasl.oauthbearer.config": f"principal=svc scope=write clientSecret={SECRET}-oauth",
    "sasl.oauthbearer.client.secret": SECRET + "-client-secret",
    "sasl.oauthbearer.extensions": f"logicalCluster=lkc-1,identityPoolId={SECRET}-ext",
    "sasl.oauthbearer.assertion.private.key.passphrase": SECRET + "-pass",
    "sasl.oauthbearer.assertion.private.key.pem": SECRET + "-assert-pem",
    "ssl.key.pem": f"-----BEGIN PRIVATE KEY-----{SECRET}-pem",
    "ssl.key.password": SECRET + "-keypw",
    "ssl.keystore.password": SECRET + "-kspw",
    "ssl_key": SECRET + "-underscore",
    "sasl.jaas.config": SECRET + "-jaas",
}
PUBLIC_CLIENT = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "OAUTHBEARER",
    "sasl.username": "svc-infogrowth",
    "ssl.ca.location": "/etc/ssl/ca.pem",
}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    client = SECRET_CLIENT | PUBLIC_CLIENT
    monkeypatch.setenv("INFOGROWTH_KAFKA__CLIENT", json.dumps(client))
    return client


def test_every_secret_bearing_librdkafka_key_is_redacted() -> None:
    from infogrowth.config import redact_client

    for fn in (redact_client,):
        out = fn(SECRET_CLIENT | PUBLIC_CLIENT)
        for key in SECRET_CLIENT:
            assert out[key] == "***", key
        for key, value in PUBLIC_CLIENT.items():
            assert out[key] == value, key
        assert SECRET not in json.dumps(out)


def test_settings_repr_and_report_config_hide_secrets(secret_env: dict[str, Any]) -> None:
    from infogrowth.config import load_settings
    from infogrowth.config import redacted_settings as redacted_config

    settings = load_settings()
    assert settings.kafka.client["sasl.oauthbearer.config"].endswith("-oauth")  # really loaded
    for text in (repr(settings), str(settings), repr(settings.kafka), str(settings.kafka)):
        assert SECRET not in text
    cfg = json.dumps(redacted_config(settings))
    assert SECRET not in cfg and "OAUTHBEARER" in cfg and "sasl.oauthbearer.config" in cfg


def test_curate_report_never_holds_oauthbearer_config(
    tmp_path: Path, secret_env: dict[str, Any]
) -> None:
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "text": "t", "embedding": {"text": [1.0, 0.0]}}]
    )
    res = CliRunner().invoke(
        main, ["curate", "--input", str(inp), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    report = (tmp_path / "o" / "report.json").read_text()
    assert SECRET not in report and SECRET not in res.output
    assert "sasl.oauthbearer.config" in report


def test_yaml_error_does_not_quote_the_secret_line(tmp_path: Path) -> None:
    from infogrowth.config import load_settings
    from infogrowth.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'kafka:\n  client:\n    sasl.password: "{SECRET}\n  bad: [\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert SECRET not in str(err.value) and "line" in str(err.value)


@pytest.fixture
def root_logging() -> Any:
    """The CLI replaces the root handlers; put them back afterwards."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield root
    root.handlers[:], level = saved
    root.setLevel(level)


def test_run_startup_log_and_errors_are_redacted(
    secret_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, root_logging: Any
) -> None:
    import infogrowth.kafka.run as run_mod

    def fake_main(settings: Any, role: str, idle_exit_s: float | None = None) -> int:
        conf = settings.kafka.client["sasl.oauthbearer.config"]
        raise ValueError(f"Invalid value for sasl.oauthbearer.config: {conf!r}")

    monkeypatch.setattr(run_mod, "main", fake_main)
    res = CliRunner().invoke(main, ["run", "--role", "embed"])
    assert res.exit_code != 0
    assert "Invalid value" in res.output and SECRET not in res.output
    startup = [line for line in res.output.splitlines() if "infogrowth run --role" in line]
    assert startup, f"no startup log line in {res.output!r}"
    assert "sasl.oauthbearer.config" in startup[0] and "OAUTHBEARER" in startup[0]


def test_log_filter_scrubs_secret_values_from_messages_and_tracebacks(
    secret_env: dict[str, Any], capsys: pytest.CaptureFixture[str], root_logging: Any
) -> None:
    import logging

    from infogrowth.config import load_settings, secret_values
    from infogrowth.logs import configure

    settings = load_settings()
    for as_json in (False, True):
        configure("INFO", as_json, secret_values(settings))
        log = logging.getLogger("infogrowth.test")
        log.error("librdkafka said %s", settings.kafka.client["sasl.password"])
        try:
            raise RuntimeError(settings.kafka.client["sasl.oauthbearer.config"])
        except RuntimeError:
            log.exception("client failed")
        err = capsys.readouterr().err
        assert "librdkafka said ***" in err and "client failed" in err
        assert "RuntimeError" in err and SECRET not in err


# ---- metrics HTTP server -------------------------------------------------------------------


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_healthz_never_answers_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    """Runtime.healthy reports ``stage failed: <exception>``: the body must not carry it."""
    from infogrowth.kafka.run import Runtime
    from infogrowth.metrics import Metrics, MetricsServer
    from tests.fixtures.helpers import make_settings

    rt = Runtime(make_settings(), "all")
    rt.errors.append(RuntimeError(f"broker said: SASL authentication failed for {SECRET}"))
    caplog.set_level("WARNING", logger="infogrowth.metrics")
    with MetricsServer(Metrics(runtime=False), "127.0.0.1", 0, health=rt.healthy) as srv:
        status, body = _get(srv.port, "/healthz")
        assert status == 503 and body == "unhealthy\n"
        assert _get(srv.port, "/healthz") == (503, "unhealthy\n")
    assert SECRET in caplog.text  # the detail goes to the log instead, once per change
    assert caplog.text.count("health probe failing") == 1


def _threads_now() -> int:
    import threading

    return threading.active_count()


def test_metrics_server_bounds_its_threads() -> None:
    """Idle connections beyond ``max_connections`` get 503 "busy", not a thread each; once the
    idle ones time out the server answers again."""
    import socket
    import time

    from infogrowth.metrics import Metrics, MetricsServer

    with MetricsServer(
        Metrics(runtime=False), "127.0.0.1", 0, max_connections=3, request_timeout_s=4.0
    ) as srv:
        base = _threads_now()
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        try:
            time.sleep(0.5)
            assert _threads_now() - base <= 3
            status, body = _get(srv.port, "/healthz")
            assert (status, body) == (503, "busy\n")
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while _get(srv.port, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "server never recovered"
            time.sleep(0.2)


def test_metrics_server_bounds_request_size() -> None:
    from infogrowth.metrics import Metrics, MetricsServer

    with MetricsServer(Metrics(runtime=False), "127.0.0.1", 0, max_request_bytes=4096) as srv:
        assert _get(srv.port, "/healthz", {"User-Agent": "kube-probe/1.31"})[0] == 200
        assert _get(srv.port, "/healthz?" + "x" * 20_000)[0] == 414
        many = {f"X-Pad-{i}": "y" * 900 for i in range(20)}  # 18 KB of headers
        assert _get(srv.port, "/healthz", many)[0] == 431
        assert _get(srv.port, "/healthz")[0] == 200


def test_metrics_server_drops_a_slow_drip() -> None:
    """A client dripping a byte at a time cannot hold a worker past the request deadline."""
    import socket
    import time

    from infogrowth.metrics import Metrics, MetricsServer

    with MetricsServer(Metrics(runtime=False), "127.0.0.1", 0, request_timeout_s=1.0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        start = time.monotonic()
        closed = False
        try:
            for b in b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"z" * 200:
                sock.sendall(bytes([b]))
                time.sleep(0.1)
                if time.monotonic() - start > 6:
                    break
        except OSError:
            closed = True
        if not closed:
            sock.settimeout(2)
            try:
                closed = sock.recv(1024) == b""
            except OSError:
                closed = True
        sock.close()
        assert closed and time.monotonic() - start < 6


class _FakeProducer:
    """Takes the place of the seed's transactional producer: records what would be produced."""

    records: ClassVar[list[tuple[str, bytes]]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        _FakeProducer.records = []

    def init_transactions(self, timeout: float) -> None: ...
    def begin_transaction(self) -> None: ...
    def commit_transaction(self, timeout: float) -> None: ...
    def poll(self, timeout: float) -> int:
        return 0

    def produce(self, topic: str, value: bytes, **kw: Any) -> None:
        self.records.append((topic, value))


@pytest.mark.parametrize("root", [None, "tree"])
def test_seed_confines_image_paths_like_curate_and_produce(
    tree: Path, monkeypatch: pytest.MonkeyPatch, root: str | None
) -> None:
    """``infogrowth seed`` reads JSONL image paths under the same rule: outside the file's
    folder (or ``--image-root``) a seed item is malformed and never reaches the changelog."""
    from infogrowth.kafka import seed as seed_mod
    from infogrowth_dev.synthetic import clustered
    from tests.fixtures.helpers import make_settings

    rows = clustered(40, seed=5, prefix="seed").samples
    rows[0] = rows[0] | {"image": "../outside/secret.jpg"}
    path = write_jsonl(tree / "data" / "seed.jsonl", rows)
    monkeypatch.setattr(seed_mod, "read_calibration", lambda settings: None)
    monkeypatch.setattr(seed_mod, "Producer", _FakeProducer)
    settings = make_settings(**{"clean.enabled": False})
    res = seed_mod.seed(settings, path, image_root=tree if root else None)
    assert res.malformed == (0 if root else 1)
    changelog = [v for t, v in _FakeProducer.records if t == settings.kafka.topics.changelog]
    assert len(changelog) == res.items == (40 if root else 39)
    assert res.calibration.epoch == 1


def test_seed_cli_passes_the_image_root(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infogrowth.kafka import seed as seed_mod

    seen: dict[str, Any] = {}

    def fake_seed(settings: Any, path: Path, **kw: Any) -> Any:
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(seed_mod, "seed", fake_seed)
    path = write_jsonl(tree / "data" / "seed.jsonl", [{"id": "x", "text": "t"}])
    res = CliRunner().invoke(main, ["seed", "--input", str(path), "--image-root", str(tree)])
    assert res.exit_code != 0 and seen == {"reset": False, "image_root": tree}
