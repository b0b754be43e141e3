"""Credentials: user JWTs, session tokens, API keys, the cluster secret, bearer metadata."""

import base64
import datetime
import hashlib
import hmac
import json
import time
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pigeon.auth import (
    ApiKeys,
    ClusterSecret,
    SessionTokens,
    UserTokenVerifier,
    bearer_token,
    check_source,
    mint_user_token,
)
from pigeon.config import GateConfig
from pigeon.errors import ConfigError, PermissionDenied, Unauthenticated
from pigeon.ids import name_problem

pytestmark = pytest.mark.unit

SECRET = "site-secret-that-is-long-enough-for-hs512-0123456789abcdef0123456789"


def rejected(verify, token) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        verify(token)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    return info.value


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def verifier():
    return UserTokenVerifier(secret=SECRET)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_hs256(key: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token built without PyJWT, which refuses some of the keys these tests need."""
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(payload).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


# --- bearer metadata -----------------------------------------------------------------------------


def test_bearer_token_is_taken_from_authorization_metadata():
    metadata = [("user-agent", "x"), ("authorization", "Bearer abc.def.ghi")]
    assert bearer_token(metadata) == "abc.def.ghi"


def test_bearer_scheme_is_case_insensitive_and_bytes_are_accepted():
    assert bearer_token([("authorization", "bearer  tok ")]) == "tok"
    assert bearer_token([("Authorization", b"BEARER tok")]) == "tok"


def test_absent_authorization_gives_none():
    assert bearer_token(None) is None
    assert bearer_token([("x-other", "Bearer tok")]) is None


def test_other_scheme_is_refused_naming_the_scheme():
    err = rejected(bearer_token, [("authorization", "Basic dXNlcjpwdw==")])
    assert err.reason == "BAD_AUTHORIZATION"
    assert "Basic" in err.message
    assert "Bearer <token>" in err.message


def test_token_without_scheme_is_refused_without_echoing_it():
    err = rejected(bearer_token, [("authorization", "eyJhbGciOi.secret.part")])
    assert "secret" not in err.message


def test_bearer_without_token_is_refused():
    assert rejected(bearer_token, [("authorization", "Bearer ")]).reason == "BAD_AUTHORIZATION"


# --- user tokens: what passes --------------------------------------------------------------------


def test_valid_token_passes_with_its_user_and_claims(verifier):
    token = mint_user_token(SECRET, "alice", ttl=60, extra={"role": "admin"})
    claims = verifier.verify(token)

    assert claims.user_id == "alice"
    assert claims.expires_at == pytest.approx(time.time() + 60, abs=5)
    assert claims.claims["role"] == "admin"


def test_token_expired_within_leeway_still_passes(verifier):
    assert verifier.verify(mint_user_token(SECRET, "alice", ttl=-3)).user_id == "alice"


def test_nbf_in_the_future_within_leeway_passes(verifier):
    token = mint_user_token(SECRET, "alice", extra={"nbf": int(time.time()) + 3})
    assert verifier.verify(token).user_id == "alice"


@pytest.mark.parametrize("algorithm", ["RS256", "RS512", "PS256"])
def test_rsa_signed_token_passes_with_the_public_key(rsa_key, algorithm):
    verifier = UserTokenVerifier(public_keys=[public_pem(rsa_key)], algorithms=[algorithm])
    token = mint_user_token(private_pem(rsa_key), "bob", algorithm=algorithm)
    assert verifier.verify(token).user_id == "bob"


def test_es256_token_passes_with_the_public_key(ec_key):
    verifier = UserTokenVerifier(public_keys=[public_pem(ec_key)], algorithms=["ES256"])
    token = mint_user_token(private_pem(ec_key), "carol", algorithm="ES256")
    assert verifier.verify(token).user_id == "carol"


def test_token_passes_when_any_of_several_keys_verifies_it(rsa_key, ec_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = UserTokenVerifier(
        secret=SECRET,
        public_keys=[public_pem(other), public_pem(ec_key), public_pem(rsa_key)],
        algorithms=["HS256", "RS256", "ES256"],
    )
    assert verifier.verify(mint_user_token(private_pem(rsa_key), "u1", algorithm="RS256"))
    assert verifier.verify(mint_user_token(private_pem(ec_key), "u2", algorithm="ES256"))
    assert verifier.verify(mint_user_token(SECRET, "u3"))


def test_certificate_can_stand_in_for_a_public_key(rsa_key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    verifier = UserTokenVerifier(public_keys=[pem], algorithms=["RS256"])
    assert verifier.verify(mint_user_token(private_pem(rsa_key), "dan", algorithm="RS256"))


def test_audience_and_issuer_pass_when_they_match():
    verifier = UserTokenVerifier(secret=SECRET, audience="site", issuer="backend")
    token = mint_user_token(SECRET, "erin", audience="site", extra={"iss": "backend"})
    assert verifier.verify(token).user_id == "erin"


# --- user tokens: what is rejected, each with its reason -----------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_rejected(verifier, token):
    err = rejected(verifier.verify, token)
    assert (err.reason, err.message) == ("TOKEN_MISSING", "missing token")


def test_expired_token_is_rejected(verifier):
    err = rejected(verifier.verify, mint_user_token(SECRET, "alice", ttl=-60))
    assert (err.reason, err.message) == ("TOKEN_EXPIRED", "token expired")


def test_forged_token_is_rejected(verifier):
    err = rejected(
        verifier.verify, mint_user_token("not-the-site-secret-but-just-as-long-0123456789", "alice")
    )
    assert (err.reason, err.message) == ("TOKEN_BAD_SIGNATURE", "invalid signature")


def test_tampered_payload_is_rejected(verifier):
    header, _, signature = mint_user_token(SECRET, "alice").split(".")
    payload = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    err = rejected(verifier.verify, f"{header}.{payload}.{signature}")
    assert err.reason == "TOKEN_BAD_SIGNATURE"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_malformed_token_is_rejected(verifier, token):
    err = rejected(verifier.verify, token)
    assert err.reason == "TOKEN_MALFORMED"
    assert err.message.startswith("malformed token: ")


def test_alg_none_is_rejected(verifier):
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", algorithm="none")
    err = rejected(verifier.verify, token)
    assert (err.reason, err.message) == ("TOKEN_BAD_ALGORITHM", "algorithm none not allowed")


def test_algorithm_not_configured_is_rejected(verifier):
    err = rejected(verifier.verify, mint_user_token(SECRET, "alice", algorithm="HS512"))
    assert (err.reason, err.message) == ("TOKEN_BAD_ALGORITHM", "algorithm HS512 not allowed")


def test_hs256_token_signed_with_the_public_key_is_rejected(rsa_key):
    # The classic algorithm-confusion attack: the public key is public, so it must never be
    # usable as an HMAC secret.
    pem = public_pem(rsa_key)
    verifier = UserTokenVerifier(public_keys=[pem], algorithms=["RS256"])
    token = hand_made_hs256(pem.encode(), {"sub": "mallory", "exp": int(time.time()) + 60})
    assert rejected(verifier.verify, token).reason == "TOKEN_BAD_ALGORITHM"


def test_hs256_token_is_rejected_when_no_secret_is_configured():
    verifier = UserTokenVerifier()
    token = hand_made_hs256(b"", {"sub": "mallory", "exp": int(time.time()) + 60})
    err = rejected(verifier.verify, token)
    assert err.reason == "TOKEN_BAD_ALGORITHM"
    assert "no key" in err.message


def test_token_signed_by_another_rsa_key_is_rejected(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = UserTokenVerifier(public_keys=[public_pem(rsa_key)], algorithms=["RS256"])
    token = mint_user_token(private_pem(other), "alice", algorithm="RS256")
    assert rejected(verifier.verify, token).reason == "TOKEN_BAD_SIGNATURE"


def test_wrong_audience_is_rejected():
    verifier = UserTokenVerifier(secret=SECRET, audience="site")
    err = rejected(verifier.verify, mint_user_token(SECRET, "alice", audience="other-site"))
    assert err.reason == "TOKEN_BAD_AUDIENCE"
    assert err.message.startswith("wrong audience")


def test_missing_audience_is_rejected_when_one_is_required():
    verifier = UserTokenVerifier(secret=SECRET, audience="site")
    assert (
        rejected(verifier.verify, mint_user_token(SECRET, "alice")).reason == "TOKEN_BAD_AUDIENCE"
    )


def test_token_with_audience_is_rejected_when_none_is_configured(verifier):
    token = mint_user_token(SECRET, "alice", audience="somebody-else")
    assert rejected(verifier.verify, token).reason == "TOKEN_BAD_AUDIENCE"


def test_wrong_issuer_is_rejected():
    verifier = UserTokenVerifier(secret=SECRET, issuer="backend")
    err = rejected(verifier.verify, mint_user_token(SECRET, "alice", extra={"iss": "evil"}))
    assert err.reason == "TOKEN_BAD_ISSUER"
    assert err.message.startswith("wrong issuer")


def test_nbf_beyond_leeway_is_rejected(verifier):
    token = mint_user_token(SECRET, "alice", extra={"nbf": int(time.time()) + 120})
    err = rejected(verifier.verify, token)
    assert err.reason == "TOKEN_NOT_YET_VALID"
    assert err.message.startswith("token not yet valid")


def test_token_without_sub_is_rejected(verifier):
    token = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    err = rejected(verifier.verify, token)
    assert (err.reason, err.message) == ("TOKEN_NO_SUBJECT", "token has no sub claim")
    assert rejected(verifier.verify, mint_user_token(SECRET, "")).reason == "TOKEN_NO_SUBJECT"


@pytest.mark.parametrize("subject", ["x" * 129, 42, "al\nice", "bob\x00"])
def test_sub_that_is_not_a_short_string_is_rejected(verifier, subject):
    token = jwt.encode({"sub": subject, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert rejected(verifier.verify, token).reason == "TOKEN_BAD_SUBJECT"


def test_token_without_exp_is_rejected(verifier):
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    err = rejected(verifier.verify, token)
    assert (err.reason, err.message) == ("TOKEN_NO_EXPIRY", "token has no exp claim")


def test_non_numeric_exp_is_malformed(verifier):
    token = jwt.encode({"sub": "alice", "exp": "tomorrow"}, SECRET, algorithm="HS256")
    assert rejected(verifier.verify, token).reason == "TOKEN_MALFORMED"


# --- user tokens: configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"algorithms": ["none"]}, "jwt_algorithms"),
        ({"algorithms": ["HS1024"]}, "jwt_algorithms"),
        ({"algorithms": []}, "jwt_algorithms"),
        ({"algorithms": ["RS256"]}, "jwt_public_keys"),
        ({"public_keys": ["not a pem"], "algorithms": ["RS256"]}, "jwt_public_keys"),
        ({"leeway": -1}, "jwt_leeway"),
    ],
)
def test_unusable_verifier_settings_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        UserTokenVerifier(**kwargs)
    assert info.value.key == key


def test_public_keys_without_a_public_key_algorithm_are_a_config_error(rsa_key):
    with pytest.raises(ConfigError) as info:
        UserTokenVerifier(public_keys=[public_pem(rsa_key)])
    assert info.value.key == "jwt_algorithms"


def test_es256_needs_a_p256_key(rsa_key):
    with pytest.raises(ConfigError) as info:
        UserTokenVerifier(public_keys=[public_pem(rsa_key)], algorithms=["ES256"])
    assert info.value.key == "jwt_public_keys"


def test_verifier_from_config_reads_the_key_files(tmp_path, ec_key):
    path = tmp_path / "site.pem"
    path.write_text(public_pem(ec_key))
    config = GateConfig(jwt_public_keys=[str(path)], jwt_algorithms=["ES256"])
    verifier = UserTokenVerifier.from_config(config)
    assert verifier.verify(mint_user_token(private_pem(ec_key), "fay", algorithm="ES256"))

    missing = GateConfig(jwt_public_keys=[str(tmp_path / "nope.pem")], jwt_algorithms=["ES256"])
    with pytest.raises(ConfigError) as info:
        UserTokenVerifier.from_config(missing)
    assert info.value.key == "jwt_public_keys"


# --- session tokens ------------------------------------------------------------------------------


def test_session_token_round_trips_user_and_node():
    sessions = SessionTokens("cluster-secret", ttl=60)
    claims = sessions.verify(sessions.issue("alice", "node-1"))
    assert (claims.user_id, claims.node_id) == ("alice", "node-1")
    assert claims.expires_at == pytest.approx(time.time() + 60, abs=5)


def test_session_token_is_not_a_user_token_even_with_the_same_secret():
    sessions = SessionTokens(SECRET)
    users = UserTokenVerifier(secret=SECRET)
    err = rejected(users.verify, sessions.issue("alice", "node-1"))
    assert err.reason in ("TOKEN_BAD_SIGNATURE", "TOKEN_BAD_AUDIENCE")


def test_user_token_is_not_a_session_token_even_with_the_same_secret_and_audience():
    sessions = SessionTokens(SECRET)
    token = mint_user_token(
        SECRET, "alice", audience="pigeon-session", extra={"iss": "pigeon-gate", "node": "n1"}
    )
    assert rejected(sessions.verify, token).reason == "TOKEN_BAD_SIGNATURE"


def test_session_token_with_session_audience_is_refused_by_user_verifier():
    # Defence in depth beyond the separate keys: the session audience is never a user audience.
    token = mint_user_token(SECRET, "alice", audience="pigeon-session")
    assert rejected(UserTokenVerifier(secret=SECRET).verify, token).reason == "TOKEN_BAD_AUDIENCE"


def test_session_token_from_another_cluster_is_rejected():
    token = SessionTokens("other-cluster").issue("alice", "node-1")
    err = rejected(SessionTokens("cluster-secret").verify, token)
    assert (err.reason, err.message) == ("TOKEN_BAD_SIGNATURE", "invalid signature")


def test_expired_session_token_is_rejected():
    token = SessionTokens("cluster-secret", ttl=-60).issue("alice", "node-1")
    err = rejected(SessionTokens("cluster-secret").verify, token)
    assert (err.reason, err.message) == ("TOKEN_EXPIRED", "session token expired")


@pytest.mark.parametrize(("token", "reason"), [(None, "TOKEN_MISSING"), ("x.y", "TOKEN_MALFORMED")])
def test_missing_or_malformed_session_token_is_rejected(token, reason):
    assert rejected(SessionTokens("cluster-secret").verify, token).reason == reason


def test_session_token_ends_by_the_expiry_it_is_given():
    sessions = SessionTokens("cluster-secret", ttl=900)
    ends = time.time() + 30.7
    claims = sessions.verify(sessions.issue("alice", "node-1", expires_at=ends))
    # Rounded down: never later than asked.
    assert claims.expires_at == int(ends)
    later = sessions.verify(sessions.issue("alice", "node-1", expires_at=time.time() + 10**6))
    assert later.expires_at == pytest.approx(time.time() + 900, abs=5)


def test_session_token_with_a_string_exp_is_malformed():
    sessions = SessionTokens("cluster-secret")
    claims = {"sub": "a", "node": "n", "exp": str(int(time.time()) + 60)}
    token = jwt.encode({**claims, "aud": "pigeon-session", "iss": "pigeon-gate"}, sessions._key)
    assert rejected(sessions.verify, token).reason == "TOKEN_MALFORMED"


def test_session_tokens_need_a_secret():
    with pytest.raises(ConfigError) as info:
        SessionTokens("")
    assert info.value.key == "cluster_secret"


# --- API keys and the cluster secret -------------------------------------------------------------


def test_valid_api_key_gives_a_stable_id_that_does_not_reveal_it():
    keys = ApiKeys(["key-one-secret", "key-two-secret", ""])
    key_id = keys.check("key-two-secret")
    assert key_id.startswith("key-")
    assert "secret" not in key_id
    assert ApiKeys(["key-two-secret", "key-one-secret"]).check("key-two-secret") == key_id
    assert keys.check("key-one-secret") != key_id
    assert len(keys) == 2


@pytest.mark.parametrize(
    ("token", "reason", "message"),
    [
        (None, "API_KEY_MISSING", "missing API key"),
        ("", "API_KEY_MISSING", "missing API key"),
        ("key-one-secreT", "API_KEY_INVALID", "invalid API key"),
    ],
)
def test_missing_or_wrong_api_key_is_rejected(token, reason, message):
    err = rejected(ApiKeys(["key-one-secret"]).check, token)
    assert (err.reason, err.message) == (reason, message)


def test_api_key_is_rejected_when_none_are_configured():
    err = rejected(ApiKeys([]).check, "anything")
    assert err.reason == "API_KEY_INVALID"
    assert "no API keys configured" in err.message


def test_cluster_secret_accepts_only_itself():
    cluster = ClusterSecret("s3cret")
    cluster.check("s3cret")
    err = rejected(cluster.check, "s3cre")
    assert (err.reason, err.message) == ("CLUSTER_SECRET_INVALID", "invalid cluster secret")
    err = rejected(cluster.check, None)
    assert (err.reason, err.message) == ("CLUSTER_SECRET_MISSING", "missing cluster secret")
    assert "s3cret" not in repr(cluster)


def test_empty_cluster_secret_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        ClusterSecret("")
    assert info.value.key == "cluster_secret"


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("ali\u200bce", "U+200B"),
        ("al\u0085ice", "U+0085"),
        ("al\u2028ice", "U+2028"),
        ("al\u2029ice", "U+2029"),
        ("ecila\u202e", "U+202E"),
        ("ali\u00a0ce", "U+00A0"),
        ("ali\u3000ce", "U+3000"),
        ("bob\x00", "U+0000"),
        (" alice", "space"),
        ("alice ", "space"),
    ],
)
def test_names_with_invisible_or_look_alike_characters_are_refused(name, says):
    problem = name_problem(name)
    assert problem is not None and says in problem


@pytest.mark.parametrize("name", ["alice", "mary ann", "Zoë", "用户", "shop-42", "a😀", "\ue000"])
def test_ordinary_names_pass(name):
    assert name_problem(name) is None


# --- API key scopes ------------------------------------------------------------------------------


def test_a_scoped_key_has_its_sources_and_others_have_none():
    shop_id = ApiKeys.key_id("shop key")
    keys = ApiKeys(["ops key", "shop key"], [f"{shop_id}=shop|billing"])
    assert keys.scope(keys.check("shop key")) == frozenset({"shop", "billing"})
    assert keys.scope(keys.check("ops key")) is None
    assert "(sources billing, shop)" in keys.describe() and "(any source)" in keys.describe()
    assert "shop key" not in keys.describe()


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        (["key-00000000=shop"], "not the id of any of api_keys"),
        (["{id}=shop", "{id}=billing"], "twice"),
        (["{id}"], "KEYID=source1|source2"),
        (["{id}=shop||billing"], "1 to 128"),
        (["{id}=sh\u200bop"], "U+200B"),
        (["the shop key itself=shop"], "KEYID"),
    ],
)
def test_bad_key_scopes_are_config_errors_that_never_show_a_key(entries, says):
    shop_id = ApiKeys.key_id("the shop key itself")
    with pytest.raises(ConfigError) as info:
        ApiKeys(["the shop key itself"], [e.format(id=shop_id) for e in entries])
    assert info.value.key == "api_key_sources" and says in info.value.message
    assert "the shop" not in info.value.message


def test_a_scope_refuses_other_sources_and_no_source():
    check_source(None, "anything")
    check_source(frozenset({"shop"}), "shop")
    for source in ("crm", ""):
        with pytest.raises(PermissionDenied) as info:
            check_source(frozenset({"shop"}), source, field="batch[1].source")
        assert info.value.reason == "SOURCE_NOT_ALLOWED"
    assert "batch[1].source" in info.value.message


def test_jwt_max_lifetime_is_a_gate_setting_that_zero_turns_off():
    token = mint_user_token(SECRET, "alice", ttl=10 * 86400)
    assert rejected(UserTokenVerifier(secret=SECRET).verify, token).reason == (
        "TOKEN_LIFETIME_TOO_LONG"
    )
    assert UserTokenVerifier(secret=SECRET, max_lifetime=0).verify(token).user_id == "alice"
    config = GateConfig(jwt_secret=SECRET, cluster_secret="c", jwt_max_lifetime=0)
    assert UserTokenVerifier.from_config(config).verify(token).user_id == "alice"
