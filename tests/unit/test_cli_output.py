"""What the CLI shows: status names, the jobs table, JSON that keeps numbers as numbers,
the stats tables (per lane and status, cost and cache savings) and lane rates.
Pure: no server.
"""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.cli import (
    format_table,
)
from conveyor.cli.jobs import LaneRates, lanes_view
from conveyor.cli.output import message_dict, plain, stats_tables
from conveyor.client import (
    TERMINAL_STATUSES,
    job_status_name,
    job_status_value,
)
from conveyor.v1 import jobs_pb2
from tests.unit.fake_services import JOB_ID


def test_job_status_names() -> None:
    assert job_status_name(jobs_pb2.JOB_STATUS_SUCCEEDED) == "succeeded"
    assert job_status_name(jobs_pb2.JOB_STATUS_DEAD) == "dead"
    assert job_status_name(jobs_pb2.JOB_STATUS_UNSPECIFIED) == "unspecified"
    assert job_status_name(99) == "99"
    assert job_status_value("running") == jobs_pb2.JOB_STATUS_RUNNING
    assert job_status_value("JOB_STATUS_FAILED") == jobs_pb2.JOB_STATUS_FAILED
    assert job_status_value(" Cancelled ") == jobs_pb2.JOB_STATUS_CANCELLED
    with pytest.raises(ValueError):
        job_status_value("finished")
    assert {job_status_name(s) for s in TERMINAL_STATUSES} == {
        "succeeded",
        "failed",
        "cancelled",
        "dead",
    }


def test_format_table() -> None:
    created = Timestamp(seconds=1_700_000_000)
    job = jobs_pb2.Job(
        id=JOB_ID,
        status=jobs_pb2.JOB_STATUS_RUNNING,
        lane="bulk",
        priority=3,
        model="claude-sonnet-4-5",
        created_at=created,
        attempts=1,
        max_attempts=3,
    )
    lines = format_table([job]).splitlines()
    assert lines[0].split()[:2] == ["ID", "STATUS"]
    assert lines[1].split() == [
        JOB_ID,
        "running",
        "bulk",
        "3",
        "claude-sonnet-4-5",
        "2023-11-14",
        "22:13:20",
        "1/3",
    ]


def test_json_of_a_message_keeps_numbers_as_numbers() -> None:
    stats = jobs_pb2.GetStatsResponse(
        counts={"pending": 3, "succeeded": 12_000_000_000},
        lanes=[jobs_pb2.LaneStats(lane="bulk", counts={"pending": 3}, queue_depth=2)],
        dead_letter_depth=1,
        tokens=jobs_pb2.Usage(input_tokens=10, output_tokens=20),
        tenant="acme",
    )
    stats.run_time_p50.FromMilliseconds(1500)
    doc = message_dict(stats, defaults=True)
    assert doc["counts"] == {"pending": 3, "succeeded": 12_000_000_000}
    assert doc["lanes"] == [{"lane": "bulk", "counts": {"pending": 3}, "queue_depth": 2}]
    assert doc["dead_letter_depth"] == 1 and doc["run_time_p50"] == 1.5
    assert doc["tokens"]["input_tokens"] == 10 and doc["tokens"]["output_tokens"] == 20


def test_stats_tables_show_each_lane_and_status_with_the_totals() -> None:
    stats = jobs_pb2.GetStatsResponse(
        counts={"pending": 4, "running": 1, "succeeded": 1234},
        lanes=[
            jobs_pb2.LaneStats(lane="interactive", counts={"running": 1}, queue_depth=0),
            jobs_pb2.LaneStats(
                lane="bulk", counts={"pending": 4, "succeeded": 1234}, queue_depth=4
            ),
        ],
        dead_letter_depth=2,
        tokens=jobs_pb2.Usage(input_tokens=5000, output_tokens=700),
        tenant="acme",
    )
    stats.run_time_p95.FromSeconds(75)
    lines = plain(*stats_tables(stats)).splitlines()
    assert lines[0].strip() == "Jobs (tenant acme)"
    assert lines[1].split()[:5] == ["LANE", "QUEUED", "PENDING", "SCHEDULED", "RUNNING"]
    assert lines[3].split() == ["bulk", "4", "4", "0", "0", "1,234", "0", "0", "0"]
    assert lines[4].split() == ["all", "4", "4", "0", "1", "1,234", "0", "0", "0"]
    summary = lines[-1].split()
    assert summary[:3] == ["2", "-", "1m15s"] and summary[3:5] == ["5,000", "700"]


def test_stats_tables_show_cost_and_cache_savings_per_tenant_model_and_lane() -> None:
    stats = jobs_pb2.GetStatsResponse(
        tenant="acme",
        costs=[
            jobs_pb2.CostStats(
                tenant="acme",
                model="claude-sonnet-4-5",
                lane="default",
                jobs=12,
                unpriced_jobs=0,
                cost_micros=1_234_567,
                cache_read_ratio=0.25,
                cache_saved_micros=90_000,
            ),
            jobs_pb2.CostStats(
                tenant="acme", model="claude-new", lane="bulk", jobs=3, unpriced_jobs=3
            ),
        ],
    )
    lines = plain(*stats_tables(stats)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["TENANT", "MODEL"])
    assert lines[header + 1].split() == [
        "acme",
        "claude-sonnet-4-5",
        "default",
        "12",
        "0",
        "$1.234567",
        "25.0%",
        "$0.090000",
    ]
    assert lines[header + 2].split()[3:5] == ["3", "3"], "unpriced jobs are counted as such"


def test_lane_rates_are_jobs_per_second_between_two_samples() -> None:
    def sample(pending: int, done: int) -> jobs_pb2.GetStatsResponse:
        counts = {"pending": pending, "succeeded": done}
        return jobs_pb2.GetStatsResponse(lanes=[jobs_pb2.LaneStats(lane="bulk", counts=counts)])

    rates = LaneRates()
    rates.sample(sample(10, 0), now=100.0)
    assert rates.done_per_s == {}, "no rate from one sample"
    rates.sample(sample(14, 6), now=102.0)
    assert rates.done_per_s == {"bulk": 3.0} and rates.new_per_s == {"bulk": 5.0}
    assert "3.0" in plain(lanes_view(sample(14, 6), rates, {"bulk": "all tenants"}))
