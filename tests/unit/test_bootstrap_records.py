"""Unit tests of the bootstrap wire records: validation, identity, ETags and pair checks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pd_serve.bootstrap.records import (
    NodeRecord,
    NodeRegistration,
    check_pair,
    is_valid_node_id,
    list_etag,
)


def body(role: str = "prefill", **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "role": role,
        "http_url": "http://127.0.0.1:9001",
        "transfer": [{"backend": "ucx", "address": "127.0.0.1:17000"}],
        "layout": {
            "architecture": "LlamaForCausalLM",
            "num_layers": 2,
            "num_kv_heads": 2,
            "head_dim": 8,
            "dtype": "bfloat16",
            "page_size": 16,
            "config_hash": "h1",
        },
        "capacity": {"total_pages": 64, "max_running_requests": 4},
    }
    base.update(changes)
    return base


def record(node_id: str, role: str = "prefill", registered_at: float = 1.0, **changes: Any) -> NodeRecord:
    return NodeRecord.model_validate(
        {
            **body(role, **changes),
            "node_id": node_id,
            "registered_at": registered_at,
            "updated_at": registered_at,
            "expires_at": registered_at + 10,
        }
    )


def error_fields(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        NodeRegistration.model_validate(data)
    return [".".join(map(str, e["loc"])) for e in info.value.errors()]


def test_valid_registration_defaults_load_to_zero() -> None:
    reg = NodeRegistration.model_validate(body())
    assert reg.load.running == 0 and reg.transfer[0].backend == "ucx"


def test_strict_types_and_unknown_fields_are_refused_with_the_field_named() -> None:
    assert error_fields(body(layout={**body()["layout"], "page_size": "16"})) == ["layout.page_size"]
    assert error_fields(body(layout={**body()["layout"], "num_layers": 0})) == ["layout.num_layers"]
    assert error_fields({**body(), "extra": 1}) == ["extra"]
    assert error_fields(body(role="router")) == ["role"]
    assert error_fields(body(transfer=[])) == ["transfer"]
    assert error_fields(body(transfer=[{"backend": "UCX!", "address": "a"}])) == ["transfer.0.backend"]


def test_colocated_node_needs_no_transfer_endpoint() -> None:
    assert NodeRegistration.model_validate(body("colocated", transfer=[])).transfer == []


@pytest.mark.parametrize(
    ("node_id", "valid"),
    [
        ("prefill-0", True),
        ("a", True),
        ("node_1.x", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("-a", False),
        ("a b", False),
        ("a/b", False),
        ("é", False),
        ("a:b", False),
    ],
)
def test_node_id_validation(node_id: str, valid: bool) -> None:
    assert is_valid_node_id(node_id) is valid


def test_same_identity_ignores_only_load() -> None:
    reg = NodeRegistration.model_validate(body())
    busy = NodeRegistration.model_validate(body(load={"running": 5}))
    assert reg.same_identity(busy)
    assert record("p0").same_identity(reg)
    assert not reg.same_identity(NodeRegistration.model_validate(body(http_url="http://other:1")))


def test_etag_tracks_membership_not_heartbeats() -> None:
    a, b = record("a"), record("b", registered_at=2.0)
    tag = list_etag([a, b])
    assert list_etag([b, a]) == tag
    beat = a.model_copy(update={"updated_at": 5.0, "expires_at": 15.0})
    assert list_etag([beat, b]) == tag
    assert list_etag([a]) != tag
    assert list_etag([record("a", registered_at=3.0), b]) != tag


def test_pair_check_reports_the_first_difference_in_order() -> None:
    p = record("p", "prefill")
    assert check_pair(p, record("d", "decode")).compatible
    assert check_pair(p, record("c", "colocated")).compatible
    two = record("d", "decode", layout={**body()["layout"], "dtype": "float16", "page_size": 32})
    result = check_pair(p, two)
    assert (result.compatible, result.field) == (False, "layout.dtype")
    assert (result.prefill_value, result.decode_value) == ("bfloat16", "float16")
    assert check_pair(record("d2", "decode"), p).field == "role"
    tp2 = record("d", "decode", transfer=[{"backend": "ucx", "address": f"h:{i}"} for i in range(2)])
    assert check_pair(p, tp2).field == "tp_size"
