"""shoal bench fanout, end to end on a small fleet: it runs and reports every field.

The figures are not checked (tests do not time things); what is checked is
that the run completes, that the orchestrator persisted exactly the events
the simulated gateways caused, and that the JSON carries every field the
table is built from.
"""

from __future__ import annotations

import json
import math

import pytest

from otaproto.errors import UsageError
from shoal import bench_fanout
from tests.conftest import require_program

GATEWAYS, NODES = 20, 5

FIELDS = {
    "gateways", "nodes_per_gateway", "nodes", "api", "api_why", "complete", "states",
    "reply_s", "created_s", "all_offered_s", "all_succeeded_s", "ingest_window_s",
    "dispatch_per_s", "ingest_per_s", "rollout_nodes_per_min", "target_dispatch_per_s",
    "target_ingest_per_s", "aws_iot_jobs_nodes_per_min", "dispatch_to_target",
    "ingest_to_target", "rollout_to_aws", "broker_raw_msgs_per_s", "broker_raw_messages",
    "broker_raw_payload_bytes", "ingest_to_broker", "dispatch_to_broker",
    "orchestrator_cpu_s", "orchestrator_cpu_total_s", "orchestrator_peak_rss_mib",
    "orchestrator_reconnects", "mosquitto_cpu_s", "simulator_cpu_s", "events_persisted",
    "events_expected", "status_events_sent", "status_events_persisted",
    "every_event_persisted", "artifact_kinds", "gateway_commands", "gateway_acks",
    "gateway_statuses", "gateway_errors", "deploy_status_reply_s", "deploy_status_counts",
}  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One small run for the whole module (it starts mosquitto and an orchestrator)."""
    require_program("mosquitto")
    return bench_fanout.run(
        gateways=GATEWAYS, nodes_per_gateway=NODES, as_json=True, raw_messages=500
    )


def test_the_rollout_completes_with_every_event_persisted(report: dict[str, object]) -> None:
    nodes = GATEWAYS * NODES
    assert report["complete"] is True
    assert report["states"] == {"succeeded": nodes}
    assert report["gateway_errors"] == 0
    assert report["status_events_sent"] == nodes * len(bench_fanout.STATUS_STEPS)
    assert report["status_events_persisted"] == report["status_events_sent"]
    assert report["events_persisted"] == report["events_expected"]
    assert report["every_event_persisted"] is True
    assert report["artifact_kinds"] == {"bsdiff4": nodes}  # the delta: the choice ran
    assert report["deploy_status_counts"] == {"succeeded": nodes}
    assert report["workdir"] is None  # cleaned up


def test_the_json_has_every_field_and_numbers_where_figures_go(
    report: dict[str, object],
) -> None:
    assert set(report) >= FIELDS
    for name in ("dispatch_per_s", "ingest_per_s", "broker_raw_msgs_per_s",
                 "orchestrator_cpu_s", "orchestrator_peak_rss_mib"):  # fmt: skip
        value = report[name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, name
    assert report["api"] in ("rollout.create", "deploy.create")


def test_json_output_is_the_returned_report(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints one JSON document (the progress lines are left out)."""
    require_program("mosquitto")
    result = bench_fanout.run(
        gateways=2, nodes_per_gateway=2, as_json=True, raw_messages=100, api="deploy"
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["api"] == "deploy.create" == result["api"]
    assert printed["complete"] is True
    assert set(printed) == set(result)


def test_the_table_names_the_figures(report: dict[str, object]) -> None:
    text = bench_fanout.table(report)
    for words in ("all offered", "all succeeded", "dispatch", "ingest", "raw broker",
                  "every event persisted", "CPU s", "peak RSS", "AWS IoT Jobs"):  # fmt: skip
        assert words in text


@pytest.mark.parametrize(
    "sizes",
    [
        {"gateways": 0, "nodes_per_gateway": 1},
        {"gateways": 1, "nodes_per_gateway": 257},
        {"gateways": 1001, "nodes_per_gateway": 10},
        {"gateways": 1, "nodes_per_gateway": 1, "api": "jobs"},
    ],
)
def test_sizes_the_orchestrator_cannot_take_raise_usage_error(sizes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        bench_fanout.run(as_json=True, **sizes)  # type: ignore[arg-type]
