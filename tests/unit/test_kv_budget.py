"""`--kv-cache-memory` and `--cpus`: what an engine's share of the machine is (issue 19)."""

from __future__ import annotations

import pytest

from pd_serve.config import ConfigError, EngineConfig
from pd_serve.kv_budget import MemorySpec, kv_budget, parse_cpu_list, parse_memory, split_cpus


@pytest.mark.parametrize(
    ("text", "spec"),
    [("auto", MemorySpec()), ("4GiB", MemorySpec(nbytes=4 << 30)), ("512MiB", MemorySpec(nbytes=512 << 20)),
     ("2G", MemorySpec(nbytes=2 * 10**9)), ("268435456", MemorySpec(nbytes=268435456)), (268435456, MemorySpec(nbytes=268435456)),
     ("0.5", MemorySpec(fraction=0.5)), ("1", MemorySpec(fraction=1.0))],
)  # fmt: skip
def test_sizes_fractions_and_auto_parse(text: str | int, spec: MemorySpec) -> None:
    assert parse_memory(text) == spec


@pytest.mark.parametrize("text", ["", "x", "0", "1.5", "-1", "4 parsecs", "0.0"])
def test_a_bad_value_is_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"kv_cache_memory \(--kv-cache-memory\)"):
        EngineConfig(kv_cache_memory=text)


def test_a_size_that_does_not_fit_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="does not fit: .* is free on cpu"):
        kv_budget(MemorySpec(nbytes=1 << 50), "cpu")
    nbytes, how = kv_budget(MemorySpec(fraction=0.5), "cpu")
    assert nbytes > 0 and "0.5 of" in how
    assert "auto: 0.25 of" in kv_budget(MemorySpec(), "cpu")[1]


def test_cpu_lists_parse_and_split_into_one_share_per_engine() -> None:
    assert parse_cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    with pytest.raises(ValueError):
        parse_cpu_list("3-1")
    with pytest.raises(ConfigError, match=r"cpus \(--cpus\)"):
        EngineConfig(cpus="a-b")
    assert split_cpus([0, 1], [1, 1]) == ["0", "1"]
    assert split_cpus([0, 1, 2], [1, 1]) == ["0", "1,2"]  # the extra CPU goes to the later (decode) node
    assert split_cpus([0], [1, 1]) is None  # fewer CPUs than engines: no pinning
