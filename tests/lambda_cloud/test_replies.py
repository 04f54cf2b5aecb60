"""Replies of the wrong shape, from every endpoint lenslab calls: one `LambdaError` line that
names the endpoint and what was wrong (exit code 5 in the CLI), never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from lenslab.errors import LambdaError, OutcomeUnknown, ProviderError, UnexpectedReply
from lenslab.providers.lambda_cloud.api import LambdaClient
from tests.support.flaky_proxy import FlakyProxy
from tests.support.lambda_emulator import LambdaEmulator

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5 me@laptop"

CALLS: dict[str, tuple[str, str, Callable[[LambdaClient], Any]]] = {
    "instance-types": ("GET", "/instance-types", lambda c: c.instance_types()),
    "instances": ("GET", "/instances", lambda c: c.instances()),
    "instance": ("GET", "/instances/abc", lambda c: c.instance("abc")),
    "launch": ("POST", "/instance-operations/launch", lambda c: c.launch("us-east-1", "t", "k", [], "n")),
    "terminate": ("POST", "/instance-operations/terminate", lambda c: c.terminate(["abc"])),
    "file-systems": ("GET", "/file-systems", lambda c: c.file_systems()),
    "create-fs": ("POST", "/filesystems", lambda c: c.create_file_system("lenslab-p", "us-east-1")),
    "ssh-keys": ("GET", "/ssh-keys", lambda c: c.ssh_keys()),
    "add-key": ("POST", "/ssh-keys", lambda c: c.add_ssh_key("k", KEY)),
}
BAD = {
    "html": ("text/html", b"<!doctype html><html><body>Down for maintenance</body></html>"),
    "null": ("application/json", b"null"),
    "list": ("application/json", b"[]"),
    "no data": ("application/json", b'{"result": 1}'),
}


def spoil(proxy: FlakyProxy, method: str, path: str, body: bytes, **options: Any) -> None:
    proxy.fail(method, "/api/v1" + path, "replace", forward=False, body=body, **options)


def one_line_error(proxy: FlakyProxy, emulator: LambdaEmulator, call: Callable[[LambdaClient], Any]) -> LambdaError:
    api = LambdaClient(emulator.api_key, base_url=proxy.url, sleep=lambda s: None)
    with pytest.raises(LambdaError) as info:
        call(api)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ProviderError.exit_code == 5
    return info.value


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", CALLS)
def test_every_endpoint_refuses_a_reply_that_is_no_envelope(
    emulator: LambdaEmulator, proxy: FlakyProxy, name: str, bad: str
) -> None:
    method, path, call = CALLS[name]
    content_type, body = BAD[bad]
    spoil(proxy, method, path, body, content_type=content_type)
    error = one_line_error(proxy, emulator, call)
    # A launch or create that may have happened says so, for its caller to look by name.
    expected = OutcomeUnknown if name == "launch" else UnexpectedReply
    assert type(error) is expected
    what = {
        "html": "the reply is not JSON (HTTP 200, text/html)",
        "null": 'unexpected reply (null instead of {"data": ...})',
        "list": 'unexpected reply (a list instead of {"data": ...})',
        "no data": 'unexpected reply (an object without `data` instead of {"data": ...})',
    }[bad]
    assert str(error) == (
        f"Lambda Cloud API {method} {path}: {what}; Lambda Cloud may be having trouble, or LAMBDA_API_URL "
        "points at something else; try again later"
    )


INSTANCE = {
    "id": "i1",
    "name": "lenslab-box",
    "status": "active",
    "ip": "127.0.0.1",
    "ssh_key_names": ["k"],
    "file_system_names": [],
    "region": {"name": "us-east-1"},
}


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("instances", None, "data: input should be a valid list, got null"),
        ("instances", {"id": "i1"}, "data: input should be a valid list, got an object"),
        ("instances", [{k: v for k, v in INSTANCE.items() if k != "status"}], "data[0].status: missing"),
        ("instances", [{**INSTANCE, "status": 5}], "data[0].status: input should be a valid string, got a number"),
        ("instances", [{**INSTANCE, "id": None}], "data[0].id: input should be a valid string, got null"),
        (
            "instances",
            [INSTANCE, "x"],
            "data[1]: input should be a valid dictionary or instance of InstanceReply, got a string",
        ),
        ("instance", [INSTANCE], "data: input should be a valid dictionary or instance of InstanceReply, got a list"),
        (
            "instance-types",
            {
                "t": {
                    "instance_type": {"name": "t", "price_cents_per_hour": "129"},
                    "regions_with_capacity_available": [],
                }
            },
            "data.t.instance_type.price_cents_per_hour: input should be a valid integer, got a string",
        ),
        (
            "instance-types",
            {"t": {"instance_type": {"name": "t", "price_cents_per_hour": 1}}},
            "data.t.regions_with_capacity_available: missing",
        ),
        ("file-systems", [{"id": "f", "name": "n"}], "data[0].region: missing"),
        (
            "terminate",
            {"terminated_instances": None},
            "data.terminated_instances: input should be a valid list, got null",
        ),
        ("ssh-keys", [{"id": "k", "name": "n"}], "data[0].public_key: missing"),
        (
            "create-fs",
            {"id": "f", "name": "n", "region": "us-east-1"},
            "data.region: input should be a valid dictionary or instance of Region, got a string",
        ),
    ],
)
def test_a_missing_or_mistyped_field_is_named(
    emulator: LambdaEmulator, proxy: FlakyProxy, name: str, data: Any, problem: str
) -> None:
    method, path, call = CALLS[name]
    spoil(proxy, method, path, json.dumps({"data": data}).encode())
    error = one_line_error(proxy, emulator, call)
    assert str(error).startswith(f"Lambda Cloud API {method} {path}: unexpected reply ({problem}")


def test_several_problems_are_counted(emulator: LambdaEmulator, proxy: FlakyProxy) -> None:
    spoil(proxy, "GET", "/instances", b'{"data": [{"id": 1}]}')
    error = one_line_error(proxy, emulator, CALLS["instances"][2])
    assert "(data[0].id: input should be a valid string, got a number; and 3 more problem(s))" in str(error)


@pytest.mark.parametrize(
    ("status", "content_type", "body", "message"),
    [
        (404, "text/html", b"<html>Not Found</html>", "Lambda Cloud API GET /instances: HTTP 404 Not Found"),
        (400, "application/json", b"null", "Lambda Cloud API GET /instances: HTTP 400 Bad Request"),
        (400, "application/json", b'{"error": "nope"}', "Lambda Cloud API GET /instances: HTTP 400 Bad Request"),
        (
            400,
            "application/json",
            b'{"error": {"code": "global/x", "message": "bad\\nMatch exec evil\\r"}}',
            "Lambda Cloud: bad Match exec evil (global/x)",
        ),
        (500, "application/json", b"[1, 2]", "Lambda Cloud API GET /instances: HTTP 500 Internal Server Error"),
    ],
)
def test_error_replies_of_any_shape_are_one_line(
    emulator: LambdaEmulator, proxy: FlakyProxy, status: int, content_type: str, body: bytes, message: str
) -> None:
    proxy.fail(
        "GET",
        "/api/v1/instances",
        "replace",
        times=10,
        forward=False,
        status=status,
        content_type=content_type,
        body=body,
    )
    error = one_line_error(proxy, emulator, CALLS["instances"][2])
    assert str(error).startswith(message + "; ")


def test_an_ip_that_is_not_an_address_never_reaches_the_ssh_config(emulator: LambdaEmulator, proxy: FlakyProxy) -> None:
    from lenslab.config import BoxConfig
    from lenslab.providers.lambda_cloud.provider import LambdaProvider

    bad = {**INSTANCE, "name": "lenslab-gpu", "ip": "1.2.3.4\nMatch exec touch /tmp/x"}
    spoil(proxy, "GET", "/instances", json.dumps({"data": [bad]}).encode())
    api = LambdaClient(emulator.api_key, base_url=proxy.url, sleep=lambda s: None)
    provider = LambdaProvider(client=api)
    with pytest.raises(UnexpectedReply) as info:
        provider.get(BoxConfig(name="gpu", provider="lambda"))
    assert str(info.value).startswith(
        "Lambda Cloud API GET /instances: instance i1 has an ip that is not an IP address; "
    )
