"""extras.keep_host_memory: glibc keeps the host memory PyTorch frees (no page faults on
re-allocation), set by the entry points unless turned off."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, compose_config

import metalearn.pipeline as pipeline
from metalearn.errors import ConfigError
from metalearn.utils.host_memory import MMAP_THRESHOLD, keep_freed_host_memory


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(
            ctypes.CDLL(None), "gnu_get_libc_version"
        )
    except OSError:
        return False


#: Allocates, writes and frees a 48 MiB tensor (above glibc's largest dynamic mmap
#: threshold, 32 MiB) 20 times in a fresh interpreter; prints the minor page faults of the
#: last 10 rounds, per round, and what keep_freed_host_memory returned.
ROUNDS = """
import json, resource, sys
import torch
from metalearn.utils.host_memory import MMAP_THRESHOLD, keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(12 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(faults[10:]) / 10}))
"""


def _faults_per_round(mode: str, environment: dict[str, str] | None = None) -> dict:
    if environment is None:  # glibc's defaults, whatever an earlier test kept
        environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env=environment,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


PAGES = (48 << 20) // 4096  # 12,288 pages of 4 KiB in each tensor


@pytest.mark.skipif(not _glibc(), reason="the setting acts on glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    default = _faults_per_round("default")
    kept = _faults_per_round("keep")
    assert kept["kept"] is True
    # glibc's default maps every such block afresh: each round faults all its pages in.
    assert default["faults"] > PAGES / 2, default
    # Kept: the block is the same heap memory every round, already resident.
    assert kept["faults"] < PAGES / 100, kept


@pytest.mark.skipif(not _glibc(), reason="the setting acts on glibc's malloc")
def test_processes_started_afresh_keep_it_too(monkeypatch):
    """ddp_spawn ranks and other fresh interpreters read the settings from GLIBC_TUNABLES."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert keep_freed_host_memory()
    child = _faults_per_round("default", dict(os.environ))  # the child does not call it
    assert child["kept"] is None
    assert child["faults"] < PAGES / 100, child


@pytest.mark.skipif(not _glibc(), reason="the setting acts on glibc's malloc")
def test_tunables_the_user_set_are_kept(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=5:glibc.malloc.arena_max=2")
    assert keep_freed_host_memory()
    assert os.environ["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.trim_threshold=5",
        "glibc.malloc.arena_max=2",
        f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}",
    ]


def test_keep_freed_host_memory_reports_what_it_did(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert keep_freed_host_memory() is _glibc()


@pytest.mark.parametrize("value, calls", [("true", 1), ("false", 0)])
def test_entry_points_follow_extras_keep_host_memory(
    value, calls, tmp_path, data_dir, real_cache_dir, monkeypatch
):
    """train and evaluate set it (or not) first, before anything that can fail."""
    seen: list[bool] = []
    monkeypatch.setattr(pipeline, "keep_freed_host_memory", lambda: seen.append(True) or True)
    setting = f"extras.keep_host_memory={value}"
    # Both runs stop at their first check of the run itself: a test without a checkpoint,
    # a checkpoint that does not exist.
    cfg = compose_config("train", [setting, "train=false"], tmp_path, data_dir, real_cache_dir)
    with pytest.raises(ConfigError, match="ckpt_path"):
        pipeline.train(cfg)
    assert len(seen) == calls
    missing = tmp_path / "missing.ckpt"
    cfg = compose_config(
        "eval", [setting, f"ckpt_path={missing}"], tmp_path, data_dir, real_cache_dir
    )
    with pytest.raises((ConfigError, FileNotFoundError)):
        pipeline.evaluate(cfg)
    assert len(seen) == 2 * calls
