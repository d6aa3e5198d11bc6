"""The launch paths' pieces alone: reading torchrun's environment, checking the topology
against its world, the rendezvous store that keeps each restart's keys apart, and our own ranks'
meeting place."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from bagel.network.config import BagelConfig
from diffusion_service import launch
from diffusion_service.launch import TorchrunWorld, group_store
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.settings import ServiceSettings, started_by_torchrun
from step_cache.policies.dbcache import DBCache
from tests.helpers.ranks import free_port

NODE1_OF_2 = {  # what torchrun --nnodes 2 --nproc-per-node 2 sets for global rank 3
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RESTART_COUNT": "2",
    "TORCHELASTIC_MAX_RESTARTS": "3",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_the_world_is_read_from_torchruns_environment():
    world = TorchrunWorld.from_env(NODE1_OF_2)
    assert world == TorchrunWorld(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        node_rank=1,
        num_nodes=2,
        restart_count=2,
        max_restarts=3,
        agent_store=True,
    )
    assert world.describe() == (
        "rank 3 of 4 (node 1 of 2, local rank 1 of 2, restart 2 of at most 3)"
    )
    assert started_by_torchrun(NODE1_OF_2)
    assert not started_by_torchrun({"RANK": "0", "WORLD_SIZE": "2"})


def test_a_topology_that_does_not_fill_torchruns_world_is_refused_with_the_valid_ones():
    world = TorchrunWorld.from_env(NODE1_OF_2)
    world.check(ParallelConfig(ulysses=2, ring=2), num_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError) as err:
        world.check(ParallelConfig(ulysses=2), num_heads=8, num_kv_heads=4)
    message = str(err.value)
    assert message.startswith(
        "torchrun started 4 ranks (2 nodes x 2 per node), and --ulysses/--kv-gather x --ring x "
        "--cfg-parallel must multiply to that: world size 4 does not equal"
    )
    assert "(cfg_parallel=1, ring=2, ulysses=2)" in message


def test_rank_0_warns_when_restarts_across_nodes_share_torchruns_store(caplog):
    rank0 = TorchrunWorld.from_env({**NODE1_OF_2, "RANK": "0", "LOCAL_RANK": "0"})
    with caplog.at_level(logging.WARNING, "diffusion_service.launch"):
        rank0.warn_about_restarts()
        TorchrunWorld.from_env(NODE1_OF_2).warn_about_restarts()  # not rank 0: silent
        TorchrunWorld.from_env(
            {**NODE1_OF_2, "RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}
        ).warn_about_restarts()
    assert len(caplog.records) == 1
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.records[0].getMessage()


def test_each_restart_meets_in_keys_of_its_own_in_torchruns_store(monkeypatch):
    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = TorchrunWorld.from_env({**NODE1_OF_2, "TORCHELASTIC_RESTART_COUNT": "0"})
    second = TorchrunWorld.from_env({**NODE1_OF_2, "TORCHELASTIC_RESTART_COUNT": "1"})
    timeout = timedelta(seconds=10)
    group_store(first, timeout).set("rank_0", "address of a rank that died")
    store = group_store(second, timeout)
    assert store.check(["rank_0"]) is False  # the dead rank's key is not seen after a restart
    store.set("rank_0", "new address")
    assert agent.get("bagel/attempt_0/rank_0") == b"address of a rank that died"
    assert agent.get("bagel/attempt_1/rank_0") == b"new address"


def test_our_own_ranks_keep_gloo_on_the_loopback_unless_the_operator_chose():
    from diffusion_service.launch import keep_gloo_on_loopback

    env: dict[str, str] = {}
    keep_gloo_on_loopback(env)
    assert env == {"GLOO_SOCKET_IFNAME": "lo"}
    chosen = {"GLOO_SOCKET_IFNAME": "eth1"}
    keep_gloo_on_loopback(chosen)
    assert chosen == {"GLOO_SOCKET_IFNAME": "eth1"}


def _settings(tmp_path, **kw) -> ServiceSettings:
    return ServiceSettings(model_dir=str(tmp_path), **kw)


def test_the_settings_pick_the_launch_path_and_only_ours_may_restart(tmp_path):
    own = launch.rank_group(_settings(tmp_path))
    torchrun = launch.rank_group(_settings(tmp_path, torchrun=True))
    assert isinstance(own, launch.OwnRanks) and own.can_restart
    assert isinstance(torchrun, launch.TorchrunRanks) and not torchrun.can_restart
    assert own.launcher_pid is None  # a group of one forks no launcher
    assert own.alive and torchrun.alive


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_our_launcher_starts_the_workers_at_a_loopback_port_stops_them_and_leaves_none(
    tmp_path, monkeypatch
):
    def worker(settings, rank, world, port):  # stands in for a rank: says who it is, then waits
        (tmp_path / f"rank{rank}").write_text(f"{os.getpid()} {world} {port}")
        time.sleep(60)

    monkeypatch.setattr(launch, "worker_main", worker)
    group = launch.rank_group(_settings(tmp_path, parallel=ParallelConfig(ring=3)))
    try:
        meeting = group._start_others()
        host, port = meeting["init_method"].removeprefix("tcp://").split(":")
        assert host == "127.0.0.1"
        files = [tmp_path / "rank1", tmp_path / "rank2"]
        deadline = time.monotonic() + 30
        while not all(f.exists() and f.read_text() for f in files):
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        said = [f.read_text().split() for f in files]
        assert [(world, p) for _, world, p in said] == [("3", port), ("3", port)]
        pids = [int(pid) for pid, _, _ in said]
        group._stop_others()
        assert all(_gone(pid) for pid in pids)
        assert group.alive
    finally:
        group.close()
    assert not group.alive
    assert _gone(group.launcher_pid)


def test_a_default_cache_the_model_cannot_use_refuses_to_start_naming_the_flag(tiny_model_dir):
    layers = BagelConfig.from_dir(tiny_model_dir).llm.num_layers
    fits = ServiceSettings(
        model_dir=str(tiny_model_dir), default_cache=DBCache(fn_compute_blocks=1)
    )
    launch.validate_settings(fits)
    too_deep = ServiceSettings(
        model_dir=str(tiny_model_dir), default_cache=DBCache(fn_compute_blocks=layers)
    )
    with pytest.raises(
        ValueError, match="^--default-cache: cache.fn_compute_blocks .* leaves none of the model.s"
    ):
        launch.validate_settings(too_deep)
