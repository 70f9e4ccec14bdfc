"""glibc heap settings (finetune_core/malloc.py): the environment a training process restarts with."""

import pytest

from finetune_core import malloc, settings


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    monkeypatch.setattr(malloc, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(malloc, "_thp_available", lambda: True)


def _probe_says(monkeypatch, faster: bool):
    calls = []

    def probe():
        calls.append(1)
        return faster, 12.5, 30.0

    monkeypatch.setattr(malloc, "huge_pages_map_faster", probe)
    return calls


def test_adds_the_tunable_and_keeps_other_tunables(supported, monkeypatch):
    _probe_says(monkeypatch, True)
    assert malloc.with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    out = malloc.with_hugepages(env)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and out["X"] == "1"
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}   # the caller's env is not modified


def test_by_default_huge_pages_only_where_the_probe_finds_them_faster(supported, monkeypatch):
    _probe_says(monkeypatch, False)
    env = {"X": "1"}
    out = malloc.with_hugepages(env)
    assert "GLIBC_TUNABLES" not in out and out["FINETUNE_HEAP_PROBE"] == "12.5,30.0" and env == {"X": "1"}
    assert settings.heap_probe(out) == {"huge_ms": 12.5, "small_ms": 30.0}
    _probe_says(monkeypatch, True)
    out = malloc.with_hugepages({})
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and out["FINETUNE_HEAP_PROBE"] == "12.5,30.0"


def test_forced_on_without_measuring_off_and_unsupported_unchanged(supported, monkeypatch):
    calls = _probe_says(monkeypatch, False)
    out = malloc.with_hugepages({"FINETUNE_HUGEPAGES": "1"})
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "FINETUNE_HEAP_PROBE" not in out
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert malloc.with_hugepages(env) is env                             # the user's own choice wins
    off = {"FINETUNE_HUGEPAGES": "0"}
    assert malloc.with_hugepages(off) is off
    monkeypatch.setattr(malloc, "_thp_available", lambda: False)
    plain = {}
    assert malloc.with_hugepages(plain) is plain
    assert not calls                                                     # none of these measured anything


def test_a_probe_that_cannot_run_keeps_small_pages_and_records_nothing(supported, monkeypatch):
    def no_madvise(nbytes, huge):
        raise AttributeError("module 'mmap' has no attribute 'MADV_HUGEPAGE'")

    monkeypatch.setattr(malloc, "first_touch_ms", no_madvise)
    env = {}
    out = malloc.with_hugepages(env)
    assert "GLIBC_TUNABLES" not in out and "FINETUNE_HEAP_PROBE" not in out
    assert settings.heap_probe({"FINETUNE_HEAP_PROBE": "nan,nan"}) is None


@pytest.mark.skipif(not malloc._thp_available(), reason="no transparent huge pages on this kernel")
def test_the_probe_touches_fresh_memory_both_ways():
    faster, huge_ms, small_ms = malloc.huge_pages_map_faster(8 << 20)
    assert isinstance(faster, bool) and faster == (huge_ms < small_ms)
    assert huge_ms > 0 and small_ms > 0
    assert malloc.first_touch_ms(4 << 20, huge=False) > 0


def test_restart_records_a_probe_that_keeps_small_pages_without_restarting(supported, monkeypatch):
    _probe_says(monkeypatch, False)
    monkeypatch.delenv("FINETUNE_RESTARTED", raising=False)
    monkeypatch.delenv("FINETUNE_HUGEPAGES", raising=False)
    monkeypatch.delenv("FINETUNE_HEAP_PROBE", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")

    def no_exec(*args):
        raise AssertionError("restarted although nothing changed")

    monkeypatch.setattr(malloc.os, "execve", no_exec)
    malloc.restart_with_hugepages()
    assert malloc.os.environ["FINETUNE_HEAP_PROBE"] == "12.5,30.0"


def test_glibc_version_check(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    assert not malloc._glibc_supports_hugetlb()
