"""toolkit.distributed.Ranks: torchrun's environment as every script reads it, and the one sharding rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from toolkit.distributed import Ranks, shard_bounds
from toolkit.utils import UserError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}


def test_from_env_reads_what_torchrun_sets_and_defaults_to_one_process():
    assert Ranks.from_env(TORCHRUN) == Ranks(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert Ranks.from_env({}) == Ranks() and not Ranks().distributed
    one = {"RANK": "0", "WORLD_SIZE": "1"}  # torchrun --nproc_per_node 1 needs no address
    assert Ranks.from_env(one) == Ranks()


@pytest.mark.parametrize("change,message", [
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"LOCAL_RANK": "1.5"}, "LOCAL_RANK='1.5' is not an integer"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0: there must be at least one rank"),
    ({"WORLD_SIZE": "-1", "RANK": "0"}, "WORLD_SIZE=-1: there must be at least one rank"),
    ({"RANK": "4"}, "RANK=4 is outside 0..3"),
    ({"RANK": "-1"}, "RANK=-1 is outside 0..3"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 and LOCAL_WORLD_SIZE=2 do not fit"),
    ({"LOCAL_WORLD_SIZE": "5"}, "LOCAL_RANK=1 and LOCAL_WORLD_SIZE=5 do not fit WORLD_SIZE=4"),
    ({"MASTER_ADDR": ""}, "WORLD_SIZE=4 but MASTER_ADDR is not set"),
    ({"MASTER_ADDR": "", "MASTER_PORT": ""}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a port number"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT='0' is not a port number"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port number"),
    ({"TOOLKIT_JOIN_TIMEOUT": "soon"}, "TOOLKIT_JOIN_TIMEOUT='soon' is not a number of seconds"),
    ({"TOOLKIT_JOIN_TIMEOUT": "-1"}, "TOOLKIT_JOIN_TIMEOUT='-1' is not a number of seconds"),
])
def test_an_inconsistent_environment_is_one_user_error(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Ranks.from_env({**TORCHRUN, **change})


def test_rank_beyond_a_one_rank_world():
    with pytest.raises(UserError, match=r"RANK=1 is outside 0\.\.0 \(WORLD_SIZE=1\)"):
        Ranks.from_env({"RANK": "1", "WORLD_SIZE": "1"})


def _slow_shard(n: int, rank: int, world: int) -> list[int]:
    """The rule spelled out: deal the items out one by one to the ranks, the first ranks first, then cut."""
    sizes = [0] * world
    for i in range(n):
        sizes[i % world] += 1
    start = sum(sizes[:rank])
    return list(range(start, start + sizes[rank]))


def test_one_sharding_rule_against_a_slow_one():
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            shards = [list(Ranks(rank=r, world_size=world).shard(n)) for r in range(world)]
            assert shards == [_slow_shard(n, r, world) for r in range(world)]
            assert sum(shards, []) == list(range(n))
            assert Ranks(world_size=world).layout(n) == [list(shard_bounds(n, r, world)) for r in range(world)]
    assert Ranks(rank=1, world_size=3).shard(10) == range(4, 7)
    with pytest.raises(UserError, match="3 ranks for 2 item"):
        Ranks(world_size=3).check_items(2)


def test_device_for_gives_each_rank_its_gpu(monkeypatch):
    import torch

    two = [Ranks(rank=r, world_size=2, local_rank=r, local_world_size=2) for r in range(2)]
    cpu = torch.device("cpu")
    assert two[1].device_for(cpu) == cpu and Ranks().device_for(torch.device("cuda")) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="needs 2 GPUs, found 1; use torchrun --nproc_per_node 1, or --cpu"):
        two[0].device_for(torch.device("cuda"), cpu_hint="--cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [r.device_for(torch.device("cuda")) for r in two] == [torch.device("cuda", 0), torch.device("cuda", 1)]


BAD_ENVIRONMENTS = {
    "RANK=x": ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    "WORLD_SIZE=0": ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: there must be at least one rank"),
    "WORLD_SIZE=-1": ({"WORLD_SIZE": "-1"}, "WORLD_SIZE=-1: there must be at least one rank"),
    "RANK=1 WORLD_SIZE=1": ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is outside 0..0"),
    "no MASTER_ADDR": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"},
                       "MASTER_ADDR is not set"),
    "MASTER_PORT=99999": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999",
                           "TORCHELASTIC_RUN_ID": "x"}, "MASTER_PORT='99999' is not a port number (1 to 65535)"),
    # A stale environment left in a shell, no torchrun: refused before anything waits for a peer.
    "stale": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
              "WORLD_SIZE=2 and RANK=0 are set, but torchrun did not start this process (no TORCHELASTIC_* variable): "
              "left over in this shell? unset RANK WORLD_SIZE MASTER_ADDR MASTER_PORT; or start the ranks with torchrun"),
}


@pytest.mark.parametrize("script,case", [("train.py", case) for case in sorted(BAD_ENVIRONMENTS)]
                         + [(script, case) for script in ("extract.py", "similarity.py")
                            for case in ("WORLD_SIZE=0", "no MASTER_ADDR", "MASTER_PORT=99999", "stale")])
def test_every_script_refuses_a_bad_torchrun_environment_in_one_line(script, case, tmp_path):
    change, message = BAD_ENVIRONMENTS[case]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC_")}
    env.update(change, PYTHONPATH=str(ROOT))
    args = {"similarity.py": ["--run", str(tmp_path / "run"), "pair", "a.png", "b.png"]}.get(
        script, ["-d", str(tmp_path / "none"), "-s", str(tmp_path / "out")])
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and message in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .partial, no output folder


def test_similarity_refuses_torchrun_in_one_line(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "similarity.py"), "--run", str(tmp_path / "run"), "pair",
                           "a.png", "b.png"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    # Every rank refuses alike; rank 0 says it (this is rank 1: it exits 2 without a line of its own).
    assert proc.returncode == 2 and proc.stderr == ""
    env["RANK"], env["LOCAL_RANK"] = "0", "0"
    proc = subprocess.run([sys.executable, str(ROOT / "similarity.py"), "--run", str(tmp_path / "run"), "pair",
                           "a.png", "b.png"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "similarity.py: error: similarity.py runs in one process; start it without torchrun"


def test_from_env_refuses_many_ranks_that_torchrun_did_not_start():
    stale = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    with pytest.raises(UserError, match=r"torchrun did not start this process \(no TORCHELASTIC_\* variable\)"):
        Ranks.from_env(stale)
    assert Ranks.from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Ranks()  # one rank: nothing to wait for
    assert Ranks.from_env({**TORCHRUN, "TOOLKIT_JOIN_TIMEOUT": "2.5"}).join_timeout == 2.5


# Each script once, and each rank once: the join is one code path (Ranks.join) for both scripts.
@pytest.mark.parametrize("script,rank", [("train.py", 0), ("extract.py", 1)])
def test_a_first_join_without_a_peer_ends_in_one_line_within_the_bound(script, rank, tmp_path):
    # torchrun's variables (as if it had started this process) but no peer ever comes: each rank gives up
    # after TOOLKIT_JOIN_TIMEOUT seconds, in one line naming the variables to unset, instead of waiting days.
    import time

    from conftest import free_port, make_pairs, planted_features

    if script == "train.py":
        args = ["-d", planted_features(tmp_path / "feats" / "features.npy", 20), "-s", tmp_path / "runs", "-e", "1",
                "--no-images", "--cpu"]
    else:
        make_pairs(tmp_path / "tll", 3)
        args = ["-d", tmp_path / "tll", "-s", tmp_path / "out", "--model", "tiny_rn", "--pretrained", "none",
                "--workers", "0", "--device", "cpu"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}, "RANK": str(rank),
           "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "stale", "TOOLKIT_JOIN_TIMEOUT": "3",
           "PYTHONPATH": str(ROOT)}
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: rank {rank} of 2: not every rank joined at 127.0.0.1:") \
        and "within 3 s" in lines[0] and "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT" \
        in lines[0], proc.stderr
    assert time.monotonic() - start < 100  # the bound, plus starting Python and torch on a loaded machine
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
