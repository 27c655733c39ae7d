"""Fault injection on the real process and broker: nothing lost, nothing duplicated, and every
decision equal to an undisturbed reference run (see `infogrowth chaos` and docs/reliability.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infogrowth_dev.chaos import CLUSTER_VICTIMS, SCENARIOS, run_scenario

pytestmark = pytest.mark.chaos
SAMPLES = int(os.environ.get("INFOGROWTH_CHAOS_SAMPLES", "5000"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(
    scenario: str, kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue("kafka_cluster") if scenario in CLUSTER_VICTIMS else None
    result = run_scenario(
        scenario,
        samples=SAMPLES,
        bootstrap=kafka_bootstrap,
        seed=7,
        workdir=tmp_path,
        cluster=cluster,
    )
    assert result.samples >= SAMPLES
    assert result.lost == 0, result
    assert result.duplicated == 0, result
    assert result.mismatched == 0, result
    assert result.embedded_mismatched == 0, result
    assert result.index_ok, result.notes
    if scenario != "poison":
        assert result.faults >= 1
    if scenario == "kill9":
        assert result.faults >= 20
    if scenario in CLUSTER_VICTIMS:
        assert result.faults == 10
        # The kills must land while there is work in flight, or they prove nothing.
        assert result.faults_mid_stream is not None and result.faults_mid_stream >= 8, result
