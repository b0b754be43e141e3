"""The secrets `pigeon up` and the test clusters run with."""

from __future__ import annotations

import json
import stat

from pigeon.local import ClusterSecrets


def test_secrets_are_generated_once_and_kept_for_the_next_run(tmp_path) -> None:
    first = ClusterSecrets.load(tmp_path, {})
    again = ClusterSecrets.load(tmp_path, {})
    assert again == first
    assert len({first.jwt_secret, first.api_key, first.cluster_secret}) == 3
    mode = stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode)
    assert mode == 0o600


def test_a_secret_from_the_environment_holds_for_that_run_alone(tmp_path) -> None:
    kept = ClusterSecrets.load(tmp_path, {})
    env = {"PIGEON_JWT_SECRET": "one-off", "PIGEON_API_KEYS": "key-a,key-b"}
    overridden = ClusterSecrets.load(tmp_path, env)
    assert overridden.jwt_secret == "one-off"
    assert overridden.api_key == "key-a"
    assert overridden.cluster_secret == kept.cluster_secret
    assert "one-off" not in (tmp_path / "secrets.json").read_text()
    assert ClusterSecrets.load(tmp_path, {}) == kept


def test_the_first_run_with_a_secret_in_the_environment_keeps_a_generated_one(tmp_path) -> None:
    first = ClusterSecrets.load(tmp_path, {"PIGEON_CLUSTER_SECRET": "from the environment"})
    assert first.cluster_secret == "from the environment"
    saved = json.loads((tmp_path / "secrets.json").read_text())
    assert saved["cluster_secret"] not in ("", "from the environment")
    assert ClusterSecrets.load(tmp_path, {}).cluster_secret == saved["cluster_secret"]
