"""How --ray starts or joins a cluster, with a stand-in for the ray module (no cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from esm2_batch.errors import InputError
from esm2_batch.run import ray_cluster
from esm2_batch.run.ray_cluster import RayOptions, connect


class FakeRay:
    """Records ray.init's arguments and the RAY_AUTH_MODE and worker niceness the cluster
    would inherit."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        import os

        self.calls.append({**kwargs, "auth": os.environ.get("RAY_AUTH_MODE"),
                           "niceness": os.environ.get("RAY_worker_niceness")})  # noqa: SIM112 (Ray reads this spelling)
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    stand_in = FakeRay()
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: stand_in)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    return stand_in


def test_local_cluster_is_loopback_only_without_token_auth(fake: FakeRay) -> None:
    connect(RayOptions(address="local"))
    (call,) = fake.calls
    assert call["_node_ip_address"] == "127.0.0.1"
    assert call["auth"] == "disabled"
    assert call["include_dashboard"] is False


def test_local_workers_run_at_the_drivers_priority(fake: FakeRay) -> None:
    """Ray's default nice 15 starves the actors on any busy machine."""
    connect(RayOptions(address="local"))
    assert fake.calls[0]["niceness"] == "0"


def test_joining_a_cluster_leaves_the_users_settings(fake: FakeRay) -> None:
    connect(RayOptions(address="10.0.0.5:6379"))
    connect(RayOptions(address="auto"))
    assert [c["address"] for c in fake.calls] == ["10.0.0.5:6379", "auto"]
    assert all(c["auth"] is None for c in fake.calls)  # never switched off for a real cluster
    assert all(c["niceness"] is None for c in fake.calls)
    assert all("_node_ip_address" not in c for c in fake.calls)


def test_a_users_own_auth_mode_wins_for_a_local_cluster(fake: FakeRay,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_worker_niceness", "10")
    connect(RayOptions(address="local"))
    assert (fake.calls[0]["auth"], fake.calls[0]["niceness"]) == ("token", "10")


def test_an_unreachable_cluster_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = FakeRay(fail=ConnectionError("Could not find any running Ray instance.\nmore"))
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: stand_in)
    with pytest.raises(InputError, match=r"cannot reach the Ray cluster at '10\.0\.0\.5:1' "
                                         r"\(Could not find any running Ray instance\.\)"):
        connect(RayOptions(address="10.0.0.5:1"))
