"""toolkit.distributed: torchrun's environment as both scripts read it."""

from __future__ import annotations

import pytest

from adaptation.distributed import Dist, from_env
from featuresExtractor.distributed import Ranks
from toolkit.distributed import torchrun_env
from toolkit.utils import UserError


def test_torchrun_env_reads_what_torchrun_sets_and_defaults_to_one_process():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert torchrun_env(env) == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2}
    assert torchrun_env({}) == {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}
    # Both scripts' views come from it.
    assert from_env(env) == Dist(rank=3, world_size=4, local_world_size=2) and from_env({}) == Dist()


def test_ranks_from_env_uses_the_shared_reader(monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert Ranks.from_env() == Ranks(rank=1, world_size=2, local_rank=0)


@pytest.mark.parametrize("key", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"])
def test_a_non_integer_is_one_user_error(key):
    with pytest.raises(UserError, match="must be integers"):
        torchrun_env({key: "two"})


@pytest.mark.parametrize("script", ["train.py", "extract.py"])
def test_scripts_refuse_a_non_integer_rank_in_one_line(script, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "RANK": "x", "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / script), "-d", str(tmp_path / "none"), "-s", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"{script}: error: RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE "
                                                "must be integers (torchrun sets them)"]
    assert not (tmp_path / "out").exists()
