"""`workers: auto`: the pure rule (relay.core.cpus) as a table, and the adapter (relay.cpus) on
cgroup files laid out the way the kernel lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import cpus
from relay.config import parse_config
from relay.core.cpus import auto_workers, quota_cpus_v1, quota_cpus_v2, workers_for_cpu


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("200000 100000", 2.0),
        ("50000 100000", 0.5),
        ("", None),
        (None, None),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_quota_from_cgroup_v2(cpu_max: str | None, expected: float | None) -> None:
    assert quota_cpus_v2(cpu_max) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1\n", "100000\n", None), ("250000", "100000", 2.5), ("x", "1", None), (None, None, None)],
)
def test_quota_from_cgroup_v1(quota: str | None, period: str | None, expected: float | None) -> None:
    assert quota_cpus_v1(quota, period) == expected


@pytest.mark.parametrize(
    ("quota", "affinity", "workers"),
    [
        (None, 2, 2),  # no quota: every CPU of the affinity mask
        (None, 16, 16),
        (1.5, 16, 2),  # a quota is rounded up
        (2.0, 16, 2),  # an exact quota is not rounded up
        (0.5, 16, 1),
        (8.0, 2, 2),  # never more than the CPUs the process may run on
        (None, None, 1),
        (None, 0, 1),
        (None, 500, 64),  # the config's maximum
    ],
)
def test_auto_workers(quota: float | None, affinity: int | None, workers: int) -> None:
    assert auto_workers(quota, affinity) == workers


@pytest.mark.parametrize(
    ("quantity", "workers"),
    [
        ("500m", 1),
        ("1", 1),
        ("1000m", 1),
        ("1001m", 2),
        ("1500m", 2),
        ("2", 2),
        ("2.5", 3),
        (3, 3),
        ("999", 64),
    ],
)
def test_workers_for_a_cpu_limit(quantity: str | int, workers: int) -> None:
    assert workers_for_cpu(quantity) == workers


@pytest.mark.parametrize("quantity", ["", "two", "1Gi", "-1", "1.5.5"])
def test_a_cpu_limit_that_is_not_a_quantity_is_refused(quantity: str) -> None:
    with pytest.raises(ValueError, match="CPU quantity"):
        workers_for_cpu(quantity)


def test_the_adapter_reads_cgroup_v2_then_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.quota_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.quota_cpus(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.quota_cpus(tmp_path) == 3.0
    assert cpus.quota_cpus(tmp_path / "missing") is None


def test_auto_is_the_default_and_resolves_to_this_process_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpus, "CGROUP", tmp_path)  # no quota: the affinity mask decides
    config = parse_config(
        {
            "hostname": "h.test",
            "listeners": [{"name": "smtp", "port": 2525}],
            "queue": {"directory": "/tmp/q"},
        }
    )
    assert config.workers == "auto"
    assert cpus.worker_count(config) == max(1, min(len(os.sched_getaffinity(0)), 64))
    assert cpus.worker_count(config.model_copy(update={"workers": 3})) == 3
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a one-CPU limit
    assert cpus.worker_count(config) == 1


@pytest.mark.parametrize("value", [0, 65, "two", "Auto", -1])
def test_workers_must_be_a_number_or_auto(value: object) -> None:
    from relay.config import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        parse_config(
            {
                "hostname": "h.test",
                "listeners": [{"name": "smtp", "port": 2525}],
                "queue": {"directory": "/tmp/q"},
                "workers": value,
            }
        )
