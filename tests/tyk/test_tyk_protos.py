"""The coprocess wire contract: .proto files, generated code, and what survives the wire."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor

from calloutkit.tyk import Event, EventReply, Object, SessionState, codegen

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

ROOT = Path(__file__).resolve().parents[2]

# The field tables of the reference, row by row: (message, number, name, type, label).
S, I32, I64, D, B, BY, E, M = "string", "int32", "int64", "double", "bool", "bytes", "enum", "msg"
X, R, MAP = "optional", "repeated", "map"
TABLES: dict[str, list[tuple[int, str, str, str]]] = {
    "StringSlice": [(1, "items", S, R)],
    "ReturnOverrides": [(1, "response_code", I32, X), (2, "response_error", S, X),
                        (3, "headers", M, MAP), (4, "override_error", B, X),
                        (5, "response_body", S, X)],
    "MiniRequestObject": [(1, "headers", M, MAP), (2, "set_headers", M, MAP),
                          (3, "delete_headers", S, R), (4, "body", S, X), (5, "url", S, X),
                          (6, "params", M, MAP), (7, "add_params", M, MAP),
                          (8, "extended_params", M, MAP), (9, "delete_params", S, R),
                          (10, "return_overrides", M, X), (11, "method", S, X),
                          (12, "request_uri", S, X), (13, "scheme", S, X),
                          (14, "raw_body", BY, X)],
    "ResponseObject": [(1, "status_code", I32, X), (2, "raw_body", BY, X), (3, "body", S, X),
                       (4, "headers", M, MAP), (5, "multivalue_headers", M, R)],
    "Header": [(1, "key", S, X), (2, "values", S, R)],
    "AccessSpec": [(1, "url", S, X), (2, "methods", S, R)],
    "AccessDefinition": [(1, "api_name", S, X), (2, "api_id", S, X), (3, "versions", S, R),
                         (4, "allowed_urls", M, R)],
    "BasicAuthData": [(1, "password", S, X), (2, "hash", S, X)],
    "JWTData": [(1, "secret", S, X)],
    "Monitor": [(1, "trigger_limits", D, R)],
    "SessionState": [
        (1, "last_check", I64, X), (2, "allowance", D, X), (3, "rate", D, X), (4, "per", D, X),
        (5, "expires", I64, X), (6, "quota_max", I64, X), (7, "quota_renews", I64, X),
        (8, "quota_remaining", I64, X), (9, "quota_renewal_rate", I64, X),
        (10, "access_rights", M, MAP), (11, "org_id", S, X), (12, "oauth_client_id", S, X),
        (13, "oauth_keys", M, MAP), (14, "basic_auth_data", M, X), (15, "jwt_data", M, X),
        (16, "hmac_enabled", B, X), (17, "hmac_secret", S, X), (18, "is_inactive", B, X),
        (19, "apply_policy_id", S, X), (20, "data_expires", I64, X), (21, "monitor", M, X),
        (22, "enable_detailed_recording", B, X), (23, "metadata", M, MAP), (24, "tags", S, R),
        (25, "alias", S, X), (26, "last_updated", S, X), (27, "id_extractor_deadline", I64, X),
        (28, "session_lifetime", I64, X), (29, "apply_policies", S, R),
        (30, "certificate", S, X), (31, "max_query_depth", I64, X), (32, "key_id", S, X),
        (33, "post_expiry_action", S, X), (34, "post_expiry_grace_period", I64, X)],
    "Object": [(1, "hook_type", E, X), (2, "hook_name", S, X), (3, "request", M, X),
               (4, "session", M, X), (5, "metadata", M, MAP), (6, "spec", M, MAP),
               (7, "response", M, X)],
    "Event": [(1, "payload", S, X)],
    "EventReply": [],
}
FILES = {"coprocess_common.proto": ["StringSlice"],
         "coprocess_return_overrides.proto": ["ReturnOverrides"],
         "coprocess_mini_request_object.proto": ["MiniRequestObject"],
         "coprocess_response_object.proto": ["ResponseObject", "Header"],
         "coprocess_session_state.proto": ["AccessSpec", "AccessDefinition", "BasicAuthData",
                                           "JWTData", "Monitor", "SessionState"],
         "coprocess_object.proto": ["Object", "Event", "EventReply"]}
_TYPES = {descriptor.FieldDescriptor.TYPE_STRING: S, descriptor.FieldDescriptor.TYPE_INT32: I32,
          descriptor.FieldDescriptor.TYPE_INT64: I64, descriptor.FieldDescriptor.TYPE_DOUBLE: D,
          descriptor.FieldDescriptor.TYPE_BOOL: B, descriptor.FieldDescriptor.TYPE_BYTES: BY,
          descriptor.FieldDescriptor.TYPE_ENUM: E, descriptor.FieldDescriptor.TYPE_MESSAGE: M}


def _label(field: descriptor.FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return MAP
    return R if field.is_repeated else X


def test_generated_code_matches_the_proto_files() -> None:
    problems = codegen.check()
    assert problems == [], "".join(problems) + "\nrun `make protos`"


def test_the_drift_check_catches_a_changed_proto(tmp_path: Path) -> None:
    protos = tmp_path / "coprocess"
    shutil.copytree(codegen.PROTO_DIR, protos)
    path = protos / "coprocess_return_overrides.proto"
    path.write_text(path.read_text().replace("string response_body = 5;",
                                             "string response_body = 6;"))
    problems = codegen.check(proto_dir=protos)
    assert any("coprocess_return_overrides_pb2.py" in p for p in problems)


def test_every_message_field_number_type_and_label_matches_the_reference() -> None:
    pool_file = Object.DESCRIPTOR.file
    seen = {}
    for file_name, messages in FILES.items():
        file = pool_file.pool.FindFileByName(file_name)
        assert file.package == "coprocess"
        assert file.GetOptions().go_package == "/coprocess"
        assert list(file.message_types_by_name) == messages
        for name in messages:
            message = file.message_types_by_name[name]
            assert message.full_name == f"coprocess.{name}"
            seen[name] = [(f.number, f.name, _TYPES[f.type], _label(f)) for f in message.fields]
    assert seen == TABLES


def test_enum_service_and_imports() -> None:
    pool = Object.DESCRIPTOR.file.pool
    hook_type = pool.FindEnumTypeByName("coprocess.HookType")
    assert [(v.name, v.number) for v in hook_type.values] == [
        ("Unknown", 0), ("Pre", 1), ("Post", 2), ("PostKeyAuth", 3), ("CustomKeyCheck", 4),
        ("Response", 5)]
    service = pool.FindServiceByName("coprocess.Dispatcher")
    assert [(m.name, m.input_type.full_name, m.output_type.full_name, m.client_streaming,
             m.server_streaming) for m in service.methods] == [
        ("Dispatch", "coprocess.Object", "coprocess.Object", False, False),
        ("DispatchEvent", "coprocess.Event", "coprocess.EventReply", False, False)]
    imports = {name: sorted(d.name for d in pool.FindFileByName(name).dependencies)
               for name in FILES}
    assert imports == {
        "coprocess_common.proto": [], "coprocess_return_overrides.proto": [],
        "coprocess_mini_request_object.proto": ["coprocess_return_overrides.proto"],
        "coprocess_response_object.proto": [], "coprocess_session_state.proto": [],
        "coprocess_object.proto": ["coprocess_common.proto",
                                   "coprocess_mini_request_object.proto",
                                   "coprocess_response_object.proto",
                                   "coprocess_session_state.proto"]}
    assert Object.DESCRIPTOR.fields_by_name["hook_type"].enum_type is hook_type


def test_bindings_import_inside_the_package_only() -> None:
    code = ("import sys, calloutkit.tyk as t; "
            "print(sorted(m for m in sys.modules if m.startswith('coprocess'))); "
            "print(t.Object.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests").stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "calloutkit._generated.coprocess.coprocess_object_pb2"


def test_unknown_fields_survive_parse_and_serialize() -> None:
    session = SessionState(rate=10, key_id="k")
    # Field 35 of SessionState (a string) and field 20 of Object (a varint): what a newer
    # gateway could add.
    session_bytes = session.SerializeToString() + b"\x9a\x02\x05later"
    obj = Object(hook_name="x")
    data = (obj.SerializeToString()
            + b"\x22" + bytes([len(session_bytes)]) + session_bytes + b"\xa0\x01\x07")
    parsed = Object.FromString(data)
    assert parsed.session.rate == 10
    again = Object.FromString(parsed.SerializeToString())
    assert b"\x9a\x02\x05later" in again.session.SerializeToString()
    assert again.SerializeToString().endswith(b"\xa0\x01\x07")


def test_event_reply_is_empty_and_event_carries_text() -> None:
    assert EventReply().SerializeToString() == b""
    assert Event.FromString(Event(payload="{}").SerializeToString()).payload == "{}"


def test_the_protobuf_floor_covers_the_generated_code() -> None:
    header = (codegen.OUT_DIR / "coprocess_object_pb2.py").read_text()
    gencode = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", header)
    floor = re.search(r'"protobuf>=(\d+)\.(\d+)(?:\.(\d+))?"',
                      (ROOT / "pyproject.toml").read_text())
    assert gencode and floor
    wanted = tuple(int(x) for x in gencode.groups())
    declared = tuple(int(x or 0) for x in floor.groups())
    assert declared >= wanted, f"generated code needs protobuf>={wanted}; pyproject says {declared}"


def test_grpc_module_offers_the_classic_stub_and_servicer() -> None:
    from calloutkit._generated.coprocess import coprocess_object_pb2_grpc as module

    assert hasattr(module, "DispatcherStub") and hasattr(module, "DispatcherServicer")


def test_the_grpcio_floor_covers_the_generated_code() -> None:
    """The generated stubs refuse to import on a grpcio older than the generator that made them."""
    stubs = (codegen.OUT_DIR / "coprocess_object_pb2_grpc.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)'", stubs)
    floor = re.search(r'"grpcio>=(\d+)\.(\d+)(?:\.(\d+))?"', (ROOT / "pyproject.toml").read_text())
    assert generated and floor
    wanted = tuple(int(x) for x in generated.groups())
    declared = tuple(int(x or 0) for x in floor.groups())
    assert declared >= wanted, f"generated code needs grpcio>={wanted}; pyproject says {declared}"
