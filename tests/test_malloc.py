"""glibc heap settings (finetune_core/malloc.py): the environment a training process restarts with."""

import pytest

from finetune_core import malloc


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    monkeypatch.setattr(malloc, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(malloc, "_thp_available", lambda: True)


def test_adds_the_tunable_and_keeps_other_tunables(supported):
    assert malloc.with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    out = malloc.with_hugepages(env)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and out["X"] == "1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"          # the caller's env is not modified


def test_unchanged_when_set_opted_out_or_unsupported(supported, monkeypatch):
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert malloc.with_hugepages(env) is env                             # the user's own choice wins
    off = {"FINETUNE_HUGEPAGES": "0"}
    assert malloc.with_hugepages(off) is off
    monkeypatch.setattr(malloc, "_thp_available", lambda: False)
    plain = {}
    assert malloc.with_hugepages(plain) is plain


def test_glibc_version_check(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not malloc._glibc_supports_hugetlb()
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    assert not malloc._glibc_supports_hugetlb()
