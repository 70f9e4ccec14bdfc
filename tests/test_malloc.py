"""glibc heap settings (finetune_core/malloc.py): the environment a training process restarts with."""

import pytest

from finetune_core import malloc


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    monkeypatch.setattr(malloc, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(malloc, "_thp_available", lambda: True)


def test_opted_in_adds_the_tunable_and_keeps_other_tunables(supported):
    assert malloc.with_hugepages({"FINETUNE_HUGEPAGES": "1"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = {"FINETUNE_HUGEPAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    out = malloc.with_hugepages(env)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and out["X"] == "1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"          # the caller's env is not modified


def test_unchanged_by_default_when_set_or_unsupported(supported, monkeypatch):
    default = {}
    assert malloc.with_hugepages(default) is default                     # opt-in: off unless asked for
    off = {"FINETUNE_HUGEPAGES": "0"}
    assert malloc.with_hugepages(off) is off
    env = {"FINETUNE_HUGEPAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert malloc.with_hugepages(env) is env                             # the user's own tunable wins
    monkeypatch.setattr(malloc, "_thp_available", lambda: False)
    unsupported = {"FINETUNE_HUGEPAGES": "1"}
    assert malloc.with_hugepages(unsupported) is unsupported


def test_glibc_version_check(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    assert not malloc._glibc_supports_hugetlb()


def test_restart_reexecutes_with_the_tunable_once_only_when_opted_in(supported, monkeypatch):
    calls = []

    def execve(path, argv, env):
        calls.append(env)

    monkeypatch.setattr(malloc.os, "execve", execve)
    monkeypatch.delenv("FINETUNE_RESTARTED", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("FINETUNE_HUGEPAGES", raising=False)
    malloc.restart_with_hugepages()
    assert calls == []                                                   # default: no restart
    monkeypatch.setenv("FINETUNE_HUGEPAGES", "1")
    malloc.restart_with_hugepages()
    assert len(calls) == 1 and calls[0]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert calls[0]["FINETUNE_RESTARTED"] == "1"                         # the new process does not restart again
    monkeypatch.setenv("FINETUNE_RESTARTED", "1")
    malloc.restart_with_hugepages()
    assert len(calls) == 1
