"""Configuration: sources, precedence, and errors that name the bad key."""

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pigeon.config import (
    CommonConfig,
    DispatcherConfig,
    GateConfig,
    NodeConfig,
    build_parser,
    env_var,
    known_env_vars,
    load_config,
)
from pigeon.errors import ConfigError

pytestmark = pytest.mark.unit


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pigeon.toml"
    path.write_text(text)
    return str(path)


def config_error(cls=NodeConfig, argv=(), env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(cls, list(argv), env or {})
    return info.value


# --- defaults and sources ------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given():
    node = load_config(NodeConfig, [], {})
    assert node.port == 7071
    assert node.http_port == 8071
    assert node.etcd_endpoints == ["127.0.0.1:2379"]
    assert node.store == "sqlite"
    assert node.max_body_bytes == 65536
    assert load_config(GateConfig, [], {}).port == 7070
    assert load_config(GateConfig, [], {}).jwt_algorithms == ["HS256"]
    assert load_config(DispatcherConfig, [], {}).port == 7072


def test_flag_beats_env_beats_toml_beats_default(tmp_path):
    path = write_toml(tmp_path, "lease_ttl = 10\n[node]\nport = 1001\n")
    env = {"PIGEON_CONFIG": path, "PIGEON_PORT": "1002"}

    assert load_config(NodeConfig, ["--port", "1003"], env).port == 1003
    assert load_config(NodeConfig, [], env).port == 1002
    assert load_config(NodeConfig, [], {"PIGEON_CONFIG": path}).port == 1001
    assert load_config(NodeConfig, [], {}).port == 7071
    assert load_config(NodeConfig, [], env).lease_ttl == 10


def test_config_flag_beats_config_env(tmp_path):
    flagged = tmp_path / "flagged.toml"
    flagged.write_text("lease_ttl = 7\n")
    env = {"PIGEON_CONFIG": str(tmp_path / "does-not-exist.toml")}

    assert load_config(NodeConfig, ["--config", str(flagged)], env).lease_ttl == 7


def test_service_table_overrides_top_level_common_setting_for_that_service_only(tmp_path):
    path = write_toml(tmp_path, 'log_level = "warning"\n[node]\nlog_level = "debug"\n')

    assert load_config(NodeConfig, ["--config", path], {}).log_level == "debug"
    assert load_config(GateConfig, ["--config", path], {}).log_level == "warning"


def test_lists_are_comma_separated_in_env_and_flags_and_arrays_in_toml(tmp_path):
    env = {"PIGEON_ETCD_ENDPOINTS": " a:1, b:2 ,,"}
    assert load_config(NodeConfig, [], env).etcd_endpoints == ["a:1", "b:2"]
    argv = ["--api-keys", "k1,k2"]
    assert load_config(NodeConfig, argv, {}).api_keys == ["k1", "k2"]
    path = write_toml(tmp_path, 'etcd_endpoints = ["x:1", "y:2"]\n')
    assert load_config(NodeConfig, ["--config", path], {}).etcd_endpoints == ["x:1", "y:2"]
    # An empty list is a valid value for a list that may be empty.
    assert load_config(NodeConfig, [], {"PIGEON_API_KEYS": ""}).api_keys == []


def test_numbers_are_parsed_from_text():
    config = load_config(
        NodeConfig,
        ["--grace-period", "2.5", "--batch-max-wait-ms", "1e1"],
        {"PIGEON_LEASE_TTL": "9"},
    )
    assert config.grace_period == 2.5
    assert config.batch_max_wait_ms == 10.0
    assert config.lease_ttl == 9


def test_float_setting_accepts_toml_integer(tmp_path):
    path = write_toml(tmp_path, "grace_period = 3\n")
    config = load_config(NodeConfig, ["--config", path], {})
    assert config.grace_period == 3.0
    assert isinstance(config.grace_period, float)


def test_choices_are_case_insensitive_and_stored_canonically():
    config = load_config(
        GateConfig, ["--jwt-algorithms", "hs256,Rs256"], {"PIGEON_LOG_LEVEL": "DEBUG"}
    )
    assert config.jwt_algorithms == ["HS256", "RS256"]
    assert config.log_level == "debug"


@dataclass(frozen=True, kw_only=True)
class _WithSwitch(NodeConfig):
    verbose_traces: bool = field(default=False, metadata={"help": "a boolean for tests"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("YES", True), ("1", True), ("false", False), ("no", False), ("0", False)],
)
def test_bool_settings_accept_true_false_one_zero_yes_no(text, expected):
    assert load_config(_WithSwitch, ["--verbose-traces", text], {}).verbose_traces is expected


def test_bad_bool_names_the_flag_and_the_accepted_words():
    err = config_error(_WithSwitch, ["--verbose-traces", "maybe"])
    assert err.key == "--verbose-traces"
    assert "true/false/1/0/yes/no" in err.message


def test_other_services_env_vars_and_foreign_env_vars_are_accepted():
    env = {"PIGEON_NODE_ID": "n1", "PIGEON_ROUTING_MODE": "broadcast", "HOME": "/root"}
    assert load_config(GateConfig, [], env).port == 7070


def test_argv_and_env_default_to_the_process(monkeypatch):
    monkeypatch.setattr("sys.argv", ["node", "--port", "1234"])
    monkeypatch.setenv("PIGEON_HTTP_PORT", "4321")
    config = load_config(NodeConfig)
    assert (config.port, config.http_port) == (1234, 4321)


# --- unknown keys --------------------------------------------------------------------------------


def test_unknown_env_var_is_named_with_a_suggestion():
    err = config_error(env={"PIGEON_JWT_SECRT": "x"})
    assert err.key == "PIGEON_JWT_SECRT"
    assert err.message == "unknown setting PIGEON_JWT_SECRT (did you mean PIGEON_JWT_SECRET?)"


def test_unknown_env_var_without_close_match_is_named_without_suggestion():
    err = config_error(env={"PIGEON_ZZZZZZZZZZ": "1"})
    assert err.message == "unknown setting PIGEON_ZZZZZZZZZZ"


def test_unknown_toml_key_is_named_with_a_suggestion(tmp_path):
    path = write_toml(tmp_path, "etcd_endpoint = ['a:1']\n")
    err = config_error(argv=["--config", path])
    assert err.key == "etcd_endpoint"
    assert "unknown setting etcd_endpoint" in err.message
    assert "did you mean etcd_endpoints?" in err.message
    assert path in err.message


def test_typo_in_another_services_table_is_caught(tmp_path):
    path = write_toml(tmp_path, "[node]\nmax_body_byts = 10\n")
    err = config_error(GateConfig, ["--config", path])
    assert err.key == "node.max_body_byts"
    assert "did you mean max_body_bytes?" in err.message


def test_bad_value_in_another_services_table_is_caught(tmp_path):
    path = write_toml(tmp_path, '[dispatcher]\nrouting_mode = "fanout"\n')
    err = config_error(NodeConfig, ["--config", path])
    assert err.key == "dispatcher.routing_mode"
    assert "expected one of routed, broadcast" in err.message


def test_unknown_toml_table_is_named_with_a_suggestion(tmp_path):
    path = write_toml(tmp_path, "[nodes]\nport = 1\n")
    err = config_error(argv=["--config", path])
    assert err.key == "nodes"
    assert "unknown table [nodes]" in err.message
    assert "did you mean [node]?" in err.message


def test_service_setting_at_top_level_says_which_table_it_belongs_in(tmp_path):
    path = write_toml(tmp_path, "max_recipients = 5\n")
    err = config_error(argv=["--config", path])
    assert err.key == "max_recipients"
    assert "move it into the [node] table" in err.message


def test_unknown_flag_is_named_with_a_suggestion():
    err = config_error(argv=["--prot", "1"])
    assert err.key == "--prot"
    assert err.message == "unknown flag --prot (did you mean --port?)"


def test_flag_of_another_service_is_unknown():
    err = config_error(GateConfig, ["--node-id", "n1"])
    assert err.key == "--node-id"


def test_abbreviated_flag_is_not_accepted():
    # argparse would otherwise take --max-body for --max-body-bytes, and break as flags are added.
    err = config_error(argv=["--max-body", "10"])
    assert err.key == "--max-body"


def test_positional_argument_is_refused():
    assert config_error(argv=["serve"]).key == "serve"


def test_flag_without_its_value_is_named():
    err = config_error(argv=["--port"])
    assert err.key == "--port"


# --- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "key", "expected"),
    [
        ([], {"PIGEON_PORT": "abc"}, "PIGEON_PORT", "expected an integer, got 'abc'"),
        (["--lease-ttl", "1"], {}, "--lease-ttl", "must be at least 2, got 1"),
        (["--port", "70000"], {}, "--port", "must be at most 65535"),
        ([], {"PIGEON_ETCD_TIMEOUT": "0"}, "PIGEON_ETCD_TIMEOUT", "must be greater than 0"),
        ([], {"PIGEON_GRACE_PERIOD": "nan"}, "PIGEON_GRACE_PERIOD", "finite"),
        (["--store", "redis"], {}, "--store", "expected one of sqlite, mongodb, got 'redis'"),
        ([], {"PIGEON_LOG_FORMAT": "xml"}, "PIGEON_LOG_FORMAT", "expected one of text, json"),
        (["--etcd-endpoints", ","], {}, "--etcd-endpoints", "must not be empty"),
        (["--etcd-prefix", "/pigeon"], {}, "--etcd-prefix", "must end with '/'"),
        (["--mongodb-uri", "localhost"], {}, "--mongodb-uri", "mongodb://"),
        (["--max-page-size", "0"], {}, "--max-page-size", "at least 1"),
    ],
)
def test_bad_value_names_the_key_and_what_is_expected(argv, env, key, expected):
    err = config_error(NodeConfig, argv, env)
    assert err.key == key
    assert key in err.message
    assert expected in err.message


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('port = "7070"', "port", "expected an integer, got '7070'"),
        ("port = true", "port", "expected an integer, got true"),
        ("port = 1.5", "port", "expected an integer"),
        ('etcd_endpoints = "a:1"', "etcd_endpoints", "expected an array of strings"),
        ("etcd_endpoints = [1, 2]", "etcd_endpoints", "expected an array of strings"),
        ('log_level = "loud"', "log_level", "expected one of debug, info, warning, error"),
        ('[gate]\njwt_algorithms = ["none"]', "gate.jwt_algorithms", "never allowed"),
        ('[gate]\njwt_algorithms = ["HS1"]', "gate.jwt_algorithms", "expected one of HS256"),
        ("[node]\nbatch_max_size = -1", "node.batch_max_size", "at least 1"),
        ("node = 3", "node", "must be a table"),
    ],
)
def test_bad_toml_value_names_the_key_and_what_is_expected(tmp_path, toml, key, expected):
    err = config_error(NodeConfig, ["--config", write_toml(tmp_path, toml + "\n")])
    assert err.key == key
    assert expected in err.message


def test_algorithm_none_is_refused_from_env():
    err = config_error(GateConfig, env={"PIGEON_JWT_ALGORITHMS": "HS256,none"})
    assert err.key == "PIGEON_JWT_ALGORITHMS"
    assert "'none' (unsigned tokens) is never allowed" in err.message


def test_tls_certificate_without_key_is_refused(tmp_path):
    err = config_error(argv=["--tls-cert", "cert.pem"])
    assert err.key == "tls_key"
    assert "PIGEON_TLS_KEY" in err.message
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("certificate")
    assert config_error(argv=["--tls-cert", str(cert), "--tls-key", str(key)]).key == "tls_key"
    key.write_text("key")
    assert load_config(NodeConfig, ["--tls-cert", str(cert), "--tls-key", str(key)], {}).tls_key


def test_missing_config_file_names_where_its_path_came_from(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert config_error(env={"PIGEON_CONFIG": missing}).key == "PIGEON_CONFIG"
    err = config_error(argv=["--config", missing])
    assert err.key == "--config"
    assert missing in err.message


def test_invalid_toml_is_reported_with_its_position(tmp_path):
    err = config_error(argv=["--config", write_toml(tmp_path, "port = \n")])
    assert "not valid TOML" in err.message
    assert "line 1" in err.message


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError) as info:
        NodeConfig(lease_ttl=1)
    assert info.value.key == "lease_ttl"


# --- the object ----------------------------------------------------------------------------------


def test_config_is_immutable():
    config = load_config(NodeConfig, [], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_secrets_are_kept_out_of_repr():
    config = load_config(
        NodeConfig,
        [
            "--jwt-secret",
            "s3cret-jwt",
            "--cluster-secret",
            "s3cret-cluster",
            "--api-keys",
            "s3cret-key",
        ],
        {"PIGEON_MONGODB_URI": "mongodb://user:s3cret-pw@db:27017"},
    )
    text = repr(config)
    assert "s3cret" not in text
    assert "max_body_bytes=65536" in text


def test_advertised_host_falls_back_to_listen_host():
    assert NodeConfig(host="10.0.0.5").advertised_host == "10.0.0.5"
    assert (
        NodeConfig(host="0.0.0.0", advertise_host="node1.internal").advertised_host
        == "node1.internal"
    )
    assert NodeConfig(host="0.0.0.0").advertised_host not in ("", "0.0.0.0")


def test_known_env_vars_lists_every_setting_of_every_service():
    names = known_env_vars()
    assert "PIGEON_CONFIG" in names
    for cls in (GateConfig, NodeConfig, DispatcherConfig):
        for f in dataclasses.fields(cls):
            assert env_var(f.name) in names
    assert "PIGEON_JWT_SECRT" not in names
    # Callers get their own copy.
    names.clear()
    assert known_env_vars()


def test_help_documents_every_setting_with_its_env_var_and_default(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(NodeConfig, ["--help"], {})
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping

    assert text.startswith("usage: python -m node")
    assert "--config PATH" in text
    for f in dataclasses.fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert env_var(f.name) in text, f.name
    assert "(env PIGEON_MAX_BODY_BYTES; default 65536)" in text
    assert "(env PIGEON_ETCD_ENDPOINTS; default 127.0.0.1:2379)" in text
    # Settings of other services are not offered.
    assert "--routing-mode" not in text


def test_build_parser_gives_each_setting_a_flag_whose_dest_is_the_field_name():
    parser = build_parser(GateConfig)
    namespace = parser.parse_args(["--jwt-audience", "site", "--port", "1"])
    assert vars(namespace) == {"jwt_audience": "site", "port": "1"}
    assert parser.prog == "python -m gate"


def test_common_config_can_be_loaded_on_its_own():
    assert load_config(CommonConfig, ["--port", "5"], {}, prog="pigeon").port == 5


def test_a_group_commit_wait_over_a_second_is_refused():
    err = config_error(env={"PIGEON_BATCH_MAX_WAIT_MS": "5000"}, cls=NodeConfig)
    assert err.key == "PIGEON_BATCH_MAX_WAIT_MS" and "1000" in err.message


# --- endpoints and bounds -----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["garbage", "host:99999", "host:0", "host:", ":2379"])
def test_a_malformed_etcd_endpoint_is_named_at_load_time(endpoint, tmp_path):
    err = config_error(GateConfig, env={"PIGEON_ETCD_ENDPOINTS": f"127.0.0.1:2379,{endpoint}"})
    assert err.key == "PIGEON_ETCD_ENDPOINTS"
    assert f"{endpoint!r} is not host:port" in err.message
    toml = write_toml(tmp_path, f'etcd_endpoints = ["{endpoint}"]\n')
    assert config_error(NodeConfig, ["--config", toml]).key == "etcd_endpoints"


def test_etcd_endpoints_in_every_accepted_form_load():
    endpoints = ["127.0.0.1:2379", "[::1]:2379", "http://etcd-1:2379", "etcd-2:65535"]
    env = {"PIGEON_ETCD_ENDPOINTS": ",".join(endpoints)}
    assert load_config(NodeConfig, [], env).etcd_endpoints == endpoints


@pytest.mark.parametrize("service", ["gate", "node", "dispatcher"])
def test_a_malformed_etcd_endpoint_stops_a_service_with_one_line_and_exit_2(service):
    env = {
        "PATH": "/usr/bin:/bin",
        "PIGEON_ETCD_ENDPOINTS": "garbage",
        "PIGEON_CLUSTER_SECRET": "cluster secret of the test",
        "PIGEON_JWT_SECRET": "jwt secret of the config tests, 32+ bytes",
    }
    result = subprocess.run(
        [sys.executable, "-m", service, "--port", "0", "--http-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"python -m {service}: bad value for PIGEON_ETCD_ENDPOINTS: 'garbage' is not host:port "
        "with a port from 1 to 65535 (e.g. 127.0.0.1:2379)"
    ]


@pytest.mark.parametrize(
    ("cls", "env", "expected"),
    [
        # Every Connect answered INTERNAL: the expiry did not fit a protobuf Timestamp.
        (GateConfig, {"PIGEON_SESSION_TTL": "9" * 23}, "at most 2592000, got a 23-digit number"),
        (GateConfig, {"PIGEON_SESSION_TTL": "2592001"}, "at most 2592000, got 2592001"),
        # An idle node spun at 90 % CPU.
        (NodeConfig, {"PIGEON_HEARTBEAT_INTERVAL": "0.000001"}, "at least 1, got 1e-06"),
        (GateConfig, {"PIGEON_HEARTBEAT_INTERVAL": "0.000001"}, "at least 1, got 1e-06"),
        (NodeConfig, {"PIGEON_HEARTBEAT_INTERVAL": "1e300"}, "at most 3600, got 1e+300"),
        (NodeConfig, {"PIGEON_LOAD_REPORT_INTERVAL": "0.001"}, "at least 0.1, got 0.001"),
        (NodeConfig, {"PIGEON_ROUTING_REPORT_INTERVAL_MS": "0.0001"}, "at least 1, got 0.0001"),
        (NodeConfig, {"PIGEON_ROUTING_REPORT_INTERVAL_MS": "60000"}, "at most 1000, got 60000"),
        # Refused by etcd at start, reported as etcd being out of reach (exit 1).
        (DispatcherConfig, {"PIGEON_LEASE_TTL": "100000000000"}, "at most 3600, got 100000000000"),
        (NodeConfig, {"PIGEON_ETCD_TIMEOUT": "0.001"}, "at least 0.1, got 0.001"),
        (NodeConfig, {"PIGEON_ETCD_TIMEOUT": "1e9"}, "at most 60, got 1000000000"),
        (NodeConfig, {"PIGEON_GRACE_PERIOD": "1e9"}, "at most 3600, got 1000000000"),
        (GateConfig, {"PIGEON_JWT_LEEWAY": "86400"}, "at most 300, got 86400"),
        (GateConfig, {"PIGEON_USER_RATE": "1e-300"}, "0 (no limit) or at least 0.01, got 1e-300"),
        (
            GateConfig,
            {"PIGEON_KEY_BURST": "1" + "0" * 400},
            "at most 1000000, got a 401-digit number",
        ),
    ],
)
def test_a_value_out_of_its_sensible_range_is_refused_at_load_time(cls, env, expected):
    [(variable, _)] = env.items()
    err = config_error(cls, env=env)
    assert err.key == variable
    assert err.message == f"bad value for {variable}: must be {expected}"


def test_values_at_the_edges_of_their_ranges_load():
    gate = load_config(
        GateConfig,
        [],
        {
            "PIGEON_SESSION_TTL": "2592000",
            "PIGEON_HEARTBEAT_INTERVAL": "1",
            "PIGEON_LEASE_TTL": "3600",
            "PIGEON_USER_RATE": "0",
            "PIGEON_KEY_RATE": "0.01",
            "PIGEON_USER_BURST": "1000000",
        },
    )
    assert (gate.session_ttl, gate.heartbeat_interval, gate.lease_ttl) == (2592000, 1.0, 3600)
    assert (gate.user_rate, gate.key_rate, gate.user_burst) == (0.0, 0.01, 1_000_000)
    node = load_config(
        NodeConfig,
        [],
        {"PIGEON_LOAD_REPORT_INTERVAL": "0.1", "PIGEON_ROUTING_REPORT_INTERVAL_MS": "1"},
    )
    assert (node.load_report_interval, node.routing_report_interval_ms) == (0.1, 1.0)


def test_a_range_written_in_a_help_text_is_the_range_enforced():
    # The README's table shows the help texts: a range written there must not drift from the rule.
    checked = 0
    for cls in (GateConfig, NodeConfig, DispatcherConfig):
        for f in dataclasses.fields(cls):
            found = re.search(r"\(([0-9.]+) to ([0-9.]+)\b", f.metadata["help"])
            if found is None:
                continue
            low, high = (float(found.group(1)), float(found.group(2)))
            assert (low, high) == (f.metadata["minimum"], f.metadata["maximum"]), f.name
            checked += 1
    assert checked >= 10
