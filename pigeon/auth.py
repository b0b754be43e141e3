"""Credentials: user JWTs, session tokens, API keys and the cluster secret.

Who presents what (ARCHITECTURE §5):

- a user presents a JWT signed by the site's backend to the Gate (:class:`UserTokenVerifier`);
- the Gate answers with a short-lived session token that the chosen node verifies locally, without
  calling back (:class:`SessionTokens`);
- system senders and operators present an API key (:class:`ApiKeys`);
- Pigeon's own processes present the cluster secret on internal RPCs (:class:`ClusterSecret`).

All of them travel as ``authorization: Bearer <credential>`` metadata (:func:`bearer_token`), and
every failure is an :class:`~pigeon.errors.Unauthenticated` whose message says what is wrong and
whose ``reason`` tells programs which case it is. Constructors given unusable settings raise
:class:`~pigeon.errors.ConfigError` so that a service fails at start-up rather than on the first
request.
"""

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pigeon.config import JWT_ALGORITHMS, GateConfig
from pigeon.errors import ConfigError, PermissionDenied, Unauthenticated
from pigeon.ids import MAX_NAME_LENGTH, name_problem, parse_source_scope

__all__ = [
    "MAX_NUMERIC_DATE",
    "MAX_TOKEN_BYTES",
    "MAX_USER_ID_LENGTH",
    "SESSION_AUDIENCE",
    "SESSION_ISSUER",
    "ApiKeys",
    "ClusterSecret",
    "SessionClaims",
    "SessionTokens",
    "UserClaims",
    "UserTokenVerifier",
    "bearer_token",
    "check_source",
    "mint_user_token",
]

MAX_USER_ID_LENGTH = MAX_NAME_LENGTH
"""Longest user id (``sub``) accepted."""

MAX_TOKEN_BYTES = 8192
"""Longest user or session token accepted, checked before any of it is decoded. Real tokens are
well under 2 KB; 8 KiB is also what most HTTP servers take in one header."""

MAX_NUMERIC_DATE = 253402300799
"""Latest ``exp``/``nbf``/``iat`` accepted: 9999-12-31T23:59:59Z, the last second a protobuf
Timestamp holds (the Gate hands the session's end to clients as one)."""

SESSION_AUDIENCE = "pigeon-session"
"""``aud`` of session tokens; user tokens must never carry it."""

SESSION_ISSUER = "pigeon-gate"
"""``iss`` of session tokens."""

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# The curve is part of the algorithm: an ES256 signature is only valid with a P-256 key.
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """Extract the credential from ``authorization: Bearer <credential>`` metadata.

    Args:
        metadata: The call's invocation metadata (``context.invocation_metadata()``).

    Returns:
        The credential, or ``None`` when there is no ``authorization`` entry.

    Raises:
        Unauthenticated: There is an ``authorization`` entry but it is not a Bearer credential
            (reason ``BAD_AUTHORIZATION``).
    """
    if metadata is None:
        return None
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, credential = text.strip().partition(" ")
        if scheme.lower() != "bearer":
            # Name the scheme only when it looks like one: a bare token pasted without "Bearer"
            # must not be echoed into an error message (and from there into logs).
            named = f"got scheme {scheme!r}" if credential and scheme.isalpha() else "no scheme"
            raise Unauthenticated(
                f'authorization metadata must be "Bearer <token>" ({named})',
                reason="BAD_AUTHORIZATION",
            )
        credential = credential.strip()
        if not credential:
            raise Unauthenticated(
                'authorization metadata is "Bearer" with no token after it',
                reason="BAD_AUTHORIZATION",
            )
        return credential
    return None


@dataclass(frozen=True)
class UserClaims:
    """What a verified user token says.

    Attributes:
        user_id: The ``sub`` claim.
        expires_at: The ``exp`` claim, Unix seconds.
        claims: Every claim of the token, for application-specific ones.
    """

    user_id: str
    expires_at: float | None
    claims: dict[str, Any]


@dataclass(frozen=True)
class SessionClaims:
    """What a verified session token says.

    Attributes:
        user_id: The user the Gate authenticated.
        node_id: The node the Gate placed the user on.
        expires_at: Unix seconds after which the token is refused.
    """

    user_id: str
    node_id: str
    expires_at: float


def _fail(message: str, reason: str, **metadata: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason, **metadata)


def _decode(
    token: str,
    key: Any,
    algorithm: str,
    *,
    what: str,
    audience: str | None,
    issuer: str | None,
    leeway: float,
    require: Sequence[str],
) -> dict[str, Any]:
    """Verify signature and claims with PyJWT and translate its errors into ours.

    Raises:
        Unauthenticated: Any failure; ``jwt.InvalidSignatureError`` is re-raised untranslated so
            that the caller can try its next key.
    """
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            # "sub" is checked by the callers, who give a more precise error than PyJWT's.
            options={"require": list(require), "verify_sub": False},
        )
    except jwt.InvalidSignatureError:
        raise
    except jwt.ExpiredSignatureError as exc:
        raise _fail(f"{what} expired", "TOKEN_EXPIRED") from exc
    except jwt.ImmatureSignatureError as exc:
        raise _fail(f"{what} not yet valid (check the clocks)", "TOKEN_NOT_YET_VALID") from exc
    except jwt.InvalidAudienceError as exc:
        expected = f"expected {audience!r}" if audience else "expected no aud claim"
        raise _fail(f"wrong audience: {expected}", "TOKEN_BAD_AUDIENCE") from exc
    except jwt.InvalidIssuerError as exc:
        raise _fail(f"wrong issuer: expected {issuer!r}", "TOKEN_BAD_ISSUER") from exc
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim == "aud":
            raise _fail(
                f"wrong audience: {what} has no aud claim, expected {audience!r}",
                "TOKEN_BAD_AUDIENCE",
            ) from exc
        if exc.claim == "iss":
            raise _fail(
                f"wrong issuer: {what} has no iss claim, expected {issuer!r}", "TOKEN_BAD_ISSUER"
            ) from exc
        if exc.claim == "exp":
            # Pigeon refuses tokens that never expire: a leaked one would work forever.
            raise _fail(f"{what} has no exp claim", "TOKEN_NO_EXPIRY") from exc
        if exc.claim == "sub":
            raise _fail(f"{what} has no sub claim", "TOKEN_NO_SUBJECT") from exc
        raise _fail(f"malformed {what}: no {exc.claim} claim", "TOKEN_MALFORMED") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise _fail(f"algorithm {algorithm} not allowed", "TOKEN_BAD_ALGORITHM") from exc
    except jwt.InvalidKeyError as exc:
        # The token's algorithm does not fit the key (e.g. an EC key for RS256).
        raise _fail("invalid signature", "TOKEN_BAD_SIGNATURE") from exc
    except jwt.InvalidTokenError as exc:
        raise _fail(f"malformed {what}: {exc}", "TOKEN_MALFORMED") from exc
    return payload


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: RFC 7519 §4 lets a parser refuse duplicate claim names, and
    a token whose ``sub`` means one user to this parser and another to the next must be refused."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _unverified_parts(token: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, checked for size and duplicate keys before PyJWT
    (which keeps the last of duplicates) sees them.

    Raises:
        Unauthenticated: ``TOKEN_TOO_LARGE``, or ``TOKEN_MALFORMED``.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise _fail(
            f"{what} is {len(token)} characters long; the limit is {MAX_TOKEN_BYTES}",
            "TOKEN_TOO_LARGE",
            limit=str(MAX_TOKEN_BYTES),
        )
    segments = token.split(".")
    if len(segments) != 3:
        raise _fail(
            f"malformed {what}: expected header.payload.signature, got {len(segments)} part(s)",
            "TOKEN_MALFORMED",
        )
    parts: list[dict[str, Any]] = []
    for name, segment in zip(("header", "payload"), segments[:2], strict=True):
        try:
            raw = base64.urlsafe_b64decode(segment.encode("ascii") + b"=" * (-len(segment) % 4))
            value = json.loads(raw, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise _fail(
                f"malformed {what}: the {name} has the key {exc.key[:40]!r} more than once",
                "TOKEN_MALFORMED",
            ) from None
        except (UnicodeError, binascii.Error, ValueError, RecursionError) as exc:
            raise _fail(
                f"malformed {what}: the {name} is not base64url-encoded JSON", "TOKEN_MALFORMED"
            ) from exc
        if not isinstance(value, dict):
            raise _fail(f"malformed {what}: the {name} is not a JSON object", "TOKEN_MALFORMED")
        parts.append(value)
    return parts[0], parts[1]


def _check_times(payload: Mapping[str, Any], what: str) -> None:
    """``exp``, ``nbf`` and ``iat`` must be JSON numbers of seconds in a sane range: PyJWT takes
    ``"exp": "9999999999"`` (it calls int() on it) and ``1e30``."""
    for claim in ("exp", "nbf", "iat"):
        if claim not in payload:
            continue
        value = payload[claim]
        if isinstance(value, bool) or not isinstance(value, int | float):
            got = "a string" if isinstance(value, str) else f"a JSON {_json_type(value)}"
        elif not math.isfinite(value) or not 0 <= value <= MAX_NUMERIC_DATE:
            got = f"{value:g}"
        else:
            continue
        raise _fail(
            f"malformed {what}: the {claim} claim must be a JSON number of seconds since "
            f"1970 (0 to {MAX_NUMERIC_DATE}), got {got}",
            "TOKEN_MALFORMED",
            claim=claim,
        )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else type(value).__name__


def _header_algorithm(header: Mapping[str, Any], what: str) -> str:
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or not algorithm:
        raise _fail(f"malformed {what}: no alg in header", "TOKEN_MALFORMED")
    # The header is attacker-controlled and ends up in error messages and logs: bound its length
    # and keep out control characters.
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in algorithm[:32])


def _check_subject(payload: Mapping[str, Any], what: str) -> str:
    subject = payload.get("sub")
    if subject is None or subject == "":
        raise _fail(f"{what} has no sub claim", "TOKEN_NO_SUBJECT")
    if not isinstance(subject, str) or len(subject) > MAX_USER_ID_LENGTH:
        raise _fail(
            f"{what} sub claim must be a string of 1 to {MAX_USER_ID_LENGTH} characters",
            "TOKEN_BAD_SUBJECT",
        )
    # The rule recipients follow (nobody could address such a user otherwise): no invisible or
    # look-alike characters, which would make "ali\u200bce" another user shown as "alice".
    problem = name_problem(subject)
    if problem is not None:
        raise _fail(
            f"{what} sub claim {problem}: user ids may not hold control characters, invisible "
            "format characters or separators, nor start or end with a space",
            "TOKEN_BAD_SUBJECT",
        )
    return subject


def _load_public_key(pem: str, index: int) -> _PublicKey:
    data = pem.encode()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(
            f"jwt_public_keys entry {index + 1} is not a PEM public key or certificate: {exc}",
            key="jwt_public_keys",
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"jwt_public_keys entry {index + 1} is a {type(key).__name__}; only RSA and EC keys "
            "are supported",
            key="jwt_public_keys",
        )
    return key


class UserTokenVerifier:
    """Verifies the user JWTs that the site's backend signs.

    A token passes when its header algorithm is one of ``algorithms``, its signature verifies with
    the secret (HS*) or one of the public keys (RS*, PS*, ES*), it has an ``exp`` in the future and
    no ``nbf``/``iat`` in the future (both give or take ``leeway``), its ``aud`` and ``iss`` match
    when configured (with no audience configured, a token carrying ``aud`` is refused, as RFC 7519
    §4.1.3 requires; that also keeps session tokens out), and its ``sub`` is a user id of 1 to 128
    characters (see :func:`pigeon.ids.name_problem`). Before any of that, the token must be at
    most :data:`MAX_TOKEN_BYTES` long, its header and payload JSON objects without a key given
    twice, and its ``exp``/``nbf``/``iat`` JSON numbers; after it, its lifetime (``exp - iat``, or
    ``exp`` minus now without ``iat``) must not exceed ``max_lifetime``.

    Example:
        .. code-block:: python

            verifier = UserTokenVerifier(secret=config.jwt_secret)
            user = verifier.verify(bearer_token(context.invocation_metadata()))
    """

    def __init__(
        self,
        *,
        secret: str = "",
        public_keys: Sequence[str] = (),
        algorithms: Sequence[str] = ("HS256",),
        audience: str = "",
        issuer: str = "",
        leeway: float = 10.0,
        max_lifetime: float = 86400.0,
    ) -> None:
        """Set up the verifier.

        An empty ``secret`` leaves HS* tokens unverifiable: they are refused (a service that only
        takes API keys can run without one), never checked against an empty key.

        Args:
            secret: HMAC secret for HS256/384/512 tokens.
            public_keys: PEM texts of RSA or EC public keys or certificates for the other
                algorithms; a token is accepted if any key of the right type verifies it.
            algorithms: Algorithms accepted; ``none`` never is.
            audience: Required ``aud``; empty means tokens must not carry one.
            issuer: Required ``iss``; empty means not checked.
            leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
            max_lifetime: Longest lifetime of a token accepted, seconds; 0 accepts any.

        Raises:
            ConfigError: An unknown algorithm, a key that is not a usable public key, public keys
                with no public-key algorithm allowed, a public-key algorithm with no key, a PEM
                key given as the HMAC secret, or a negative leeway or lifetime.
        """
        self._algorithms = frozenset(self._check_algorithms(algorithms))
        self._public_keys = [_load_public_key(pem, i) for i, pem in enumerate(public_keys)]
        asymmetric = sorted(self._algorithms - _HMAC_ALGORITHMS)
        if self._public_keys and not asymmetric:
            raise ConfigError(
                "jwt_public_keys are set but jwt_algorithms allows no public-key algorithm; "
                "add RS256, ES256 or whichever the keys are for",
                key="jwt_algorithms",
            )
        for algorithm in asymmetric:
            if not self._keys_for(algorithm):
                raise ConfigError(
                    f"jwt_algorithms allows {algorithm} but no jwt_public_keys entry is a "
                    f"{'P-256/P-384 EC' if algorithm.startswith('ES') else 'RSA'} key for it",
                    key="jwt_public_keys",
                )
        if secret:
            try:
                jwt.get_algorithm_by_name("HS256").prepare_key(secret)
            except jwt.InvalidKeyError as exc:
                raise ConfigError(f"jwt_secret is unusable: {exc}", key="jwt_secret") from exc
        if leeway < 0:
            raise ConfigError(f"jwt_leeway must be at least 0, got {leeway:g}", key="jwt_leeway")
        if max_lifetime < 0:
            raise ConfigError(
                f"jwt_max_lifetime must be at least 0, got {max_lifetime:g}",
                key="jwt_max_lifetime",
            )
        self._max_lifetime = max_lifetime
        self._secret = secret
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway

    @classmethod
    def from_config(cls, config: GateConfig) -> "UserTokenVerifier":
        """Build the verifier from the Gate's settings, reading the public key files.

        Args:
            config: The Gate's config.

        Returns:
            The verifier.

        Raises:
            ConfigError: A key file cannot be read, no allowed algorithm has a key, or any reason
                :meth:`__init__` gives.
        """
        pems: list[str] = []
        for path in config.jwt_public_keys:
            try:
                pems.append(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(
                    f"cannot read jwt_public_keys file {path}: {exc.strerror or exc}",
                    key="jwt_public_keys",
                ) from exc
        verifier = cls(
            secret=config.jwt_secret,
            public_keys=pems,
            algorithms=config.jwt_algorithms,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
            max_lifetime=config.jwt_max_lifetime,
        )
        if not any(verifier._keys_for(algorithm) for algorithm in verifier._algorithms):
            # Every Connect would be refused: a Gate that cannot let anyone in is a mistake.
            raise ConfigError(
                "the Gate has no key to verify user tokens with: set jwt_secret "
                "(PIGEON_JWT_SECRET) for HS256, or jwt_public_keys with RS256/ES256 in "
                "jwt_algorithms",
                key="jwt_secret",
            )
        return verifier

    @staticmethod
    def _check_algorithms(algorithms: Sequence[str]) -> list[str]:
        if not algorithms:
            raise ConfigError("jwt_algorithms must not be empty", key="jwt_algorithms")
        checked = []
        for algorithm in algorithms:
            if algorithm.lower() == "none":
                raise ConfigError(
                    "jwt_algorithms must not contain 'none' (unsigned tokens)",
                    key="jwt_algorithms",
                )
            if algorithm not in JWT_ALGORITHMS:
                raise ConfigError(
                    f"jwt_algorithms: unknown algorithm {algorithm!r}; expected one of "
                    + ", ".join(JWT_ALGORITHMS),
                    key="jwt_algorithms",
                )
            checked.append(algorithm)
        return checked

    def _keys_for(self, algorithm: str) -> list[Any]:
        if algorithm in _HMAC_ALGORITHMS:
            return [self._secret] if self._secret else []
        if algorithm in _RSA_ALGORITHMS:
            return [k for k in self._public_keys if isinstance(k, rsa.RSAPublicKey)]
        curve = _EC_CURVES.get(algorithm)
        return [
            k
            for k in self._public_keys
            if isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == curve
        ]

    def verify(self, token: str | None) -> UserClaims:
        """Verify a user token.

        Args:
            token: The token, e.g. from :func:`bearer_token`; ``None`` or empty when absent.

        Returns:
            The user id, expiry and claims.

        Raises:
            Unauthenticated: With reason ``TOKEN_MISSING``, ``TOKEN_TOO_LARGE``,
                ``TOKEN_MALFORMED``, ``TOKEN_BAD_ALGORITHM``, ``TOKEN_BAD_SIGNATURE``,
                ``TOKEN_EXPIRED``, ``TOKEN_NOT_YET_VALID``, ``TOKEN_NO_EXPIRY``,
                ``TOKEN_BAD_AUDIENCE``, ``TOKEN_BAD_ISSUER``, ``TOKEN_NO_SUBJECT``,
                ``TOKEN_BAD_SUBJECT`` or ``TOKEN_LIFETIME_TOO_LONG``.
        """
        if not token:
            raise _fail("missing token", "TOKEN_MISSING")
        header, unverified = _unverified_parts(token, "token")
        algorithm = _header_algorithm(header, "token")
        # Checked before any key is touched: this is what stops "alg": "none" and HS256 tokens
        # "signed" with a public key (algorithm confusion).
        if algorithm not in self._algorithms:
            raise _fail(f"algorithm {algorithm} not allowed", "TOKEN_BAD_ALGORITHM")
        keys = self._keys_for(algorithm)
        if not keys:
            raise _fail(
                f"algorithm {algorithm} not allowed: no key for it is configured",
                "TOKEN_BAD_ALGORITHM",
            )
        _check_times(unverified, "token")
        for key in keys:
            try:
                payload = _decode(
                    token,
                    key,
                    algorithm,
                    what="token",
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    require=("exp",),
                )
            except jwt.InvalidSignatureError:
                continue
            user_id = _check_subject(payload, "token")
            self._check_lifetime(payload)
            return UserClaims(user_id=user_id, expires_at=float(payload["exp"]), claims=payload)
        raise _fail("invalid signature", "TOKEN_BAD_SIGNATURE")

    def _check_lifetime(self, payload: Mapping[str, Any]) -> None:
        # A leaked token is good until its exp: a backend that signs tokens for years (or by
        # mistake for 1e30 s) should hear about it on the first Connect, not after a leak.
        if not self._max_lifetime:
            return
        exp = float(payload["exp"])
        if "iat" in payload:
            lifetime, since, slack = exp - float(payload["iat"]), "exp - iat", 0.0
        else:
            # Without iat only what is left can be measured; the leeway covers clock skew.
            lifetime, since, slack = exp - time.time(), "exp - now, as it has no iat", self._leeway
        if lifetime > self._max_lifetime + slack:
            raise _fail(
                f"token lifetime is {lifetime:.0f} s ({since}); this Gate accepts at most "
                f"{self._max_lifetime:g} s (jwt_max_lifetime): sign shorter-lived tokens",
                "TOKEN_LIFETIME_TOO_LONG",
                limit=f"{self._max_lifetime:g}",
            )


def mint_user_token(
    secret: str,
    user_id: str,
    *,
    ttl: float = 3600,
    algorithm: str = "HS256",
    audience: str = "",
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Sign a user token the way a site's backend would (for ``pigeon token`` and tests).

    Args:
        secret: HMAC secret for HS*, or a PEM private key for RS*/PS*/ES*.
        user_id: The ``sub`` claim.
        ttl: Seconds until ``exp``; a negative value makes an already expired token.
        algorithm: Signing algorithm.
        audience: ``aud`` claim; omitted when empty.
        extra: More claims; they override the ones above (e.g. ``{"nbf": ...}``).

    Returns:
        The encoded JWT.
    """
    now = time.time()
    payload: dict[str, Any] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    if audience:
        payload["aud"] = audience
    if extra:
        payload.update(extra)
    return jwt.encode(payload, secret, algorithm=algorithm)


VERIFIED_CACHE = 100_000
"""How many verified session tokens a process remembers."""


class SessionTokens:
    """Issues (Gate) and verifies (node) the session tokens that admit a user to a node.

    HS256 with ``aud="pigeon-session"``, ``iss="pigeon-gate"`` and claims ``sub`` (user id),
    ``node`` (node id), ``iat``, ``exp`` and ``jti``. The signing key is derived from the secret
    rather than being the secret itself, so even when an operator uses one string as both
    ``jwt_secret`` and the session secret, a user token can never pass as a session token or the
    reverse.
    """

    def __init__(self, secret: str, *, ttl: float = 900, leeway: float = 10.0) -> None:
        """Set up issuing and verifying.

        Args:
            secret: Secret shared by the Gate and every node (the cluster secret).
            ttl: Lifetime of issued tokens, seconds.
            leeway: Seconds of clock skew tolerated between the Gate and the nodes.

        Raises:
            ConfigError: ``secret`` is empty (anyone could forge sessions).
        """
        if not secret:
            raise ConfigError(
                "session tokens need a secret shared by the Gate and the nodes: set "
                "cluster_secret (PIGEON_CLUSTER_SECRET)",
                key="cluster_secret",
            )
        self._key = hmac.new(secret.encode(), b"pigeon session token key v1", "sha256").digest()
        self._ttl = ttl
        self._leeway = leeway
        # Verified tokens, so a client's every call does not pay PyJWT's ~300 us again; bounded,
        # and an entry counts only until its token expires.
        self._verified: dict[str, SessionClaims] = {}

    def issue(self, user_id: str, node_id: str, *, expires_at: float | None = None) -> str:
        """Issue a session token.

        Args:
            user_id: The authenticated user.
            node_id: The node the user is placed on.
            expires_at: Unix seconds the session must end by (the user token's ``exp``): the
                token expires then if that is sooner than the TTL.

        Returns:
            The encoded token.
        """
        now = time.time()
        ends = now + self._ttl if expires_at is None else min(now + self._ttl, expires_at)
        payload = {
            "sub": user_id,
            "node": node_id,
            "iat": int(now),
            # Rounded down: a session may end a fraction of a second early, never late.
            "exp": math.floor(ends),
            "jti": secrets.token_urlsafe(12),
            "aud": SESSION_AUDIENCE,
            "iss": SESSION_ISSUER,
        }
        return jwt.encode(payload, self._key, algorithm="HS256")

    def usable_until(self, claims: SessionClaims) -> float:
        """Unix seconds after which the session is refused: its expiry, plus the leeway."""
        return claims.expires_at + self._leeway

    def verify(self, token: str | None) -> SessionClaims:
        """Check a session token (see :meth:`_verify`), remembering the ones that pass."""
        if token:
            known = self._verified.get(token)
            if known is not None and time.time() < known.expires_at + self._leeway:
                return known
        claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token or ""] = claims
        return claims

    def _verify(self, token: str | None) -> SessionClaims:
        """Verify a session token.

        Args:
            token: The token; ``None`` or empty when absent.

        Returns:
            User id, node id and expiry. Whether the node id is this node is the caller's call.

        Raises:
            Unauthenticated: Same reasons as :meth:`UserTokenVerifier.verify`; messages say
                "session token".
        """
        what = "session token"
        if not token:
            raise _fail(f"missing {what}", "TOKEN_MISSING")
        header, unverified = _unverified_parts(token, what)
        algorithm = _header_algorithm(header, what)
        if algorithm != "HS256":
            raise _fail(f"algorithm {algorithm} not allowed", "TOKEN_BAD_ALGORITHM")
        _check_times(unverified, what)
        try:
            payload = _decode(
                token,
                self._key,
                algorithm,
                what=what,
                audience=SESSION_AUDIENCE,
                issuer=SESSION_ISSUER,
                leeway=self._leeway,
                require=("exp", "aud", "iss"),
            )
        except jwt.InvalidSignatureError as exc:
            raise _fail("invalid signature", "TOKEN_BAD_SIGNATURE") from exc
        user_id = _check_subject(payload, what)
        node_id = payload.get("node")
        if not isinstance(node_id, str) or not node_id:
            raise _fail(f"malformed {what}: no node claim", "TOKEN_MALFORMED")
        return SessionClaims(user_id=user_id, node_id=node_id, expires_at=float(payload["exp"]))


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest constant-time even when lengths differ.
    return hashlib.sha256(value.encode()).digest()


def _looks_like_jwt(token: str) -> bool:
    """Whether a string parses as a JWT (header.payload.signature with a JSON header)."""
    if len(token) > MAX_TOKEN_BYTES:
        # Only for a clearer error: a wrong key is not worth decoding kilobytes of.
        return False
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False
    return "alg" in header


class ApiKeys:
    """The API keys that system senders and operators present, and the sources each may act for.

    A key with no scope may publish as any source (operators, a backend that speaks for all);
    a scoped key only as the sources of its scope (see :func:`check_source`).

    Example:
        .. code-block:: python

            keys = ApiKeys(config.api_keys, config.api_key_sources)
            key_id = keys.check(bearer_token(context.invocation_metadata()))
            sources = keys.scope(key_id)
    """

    def __init__(self, keys: Iterable[str], sources: Iterable[str] = ()) -> None:
        """Remember the accepted keys and their scopes.

        Args:
            keys: Accepted keys; empty strings (a stray comma in the config) are ignored.
            sources: Scopes, ``KEYID=source1|source2`` each (``api_key_sources``), where KEYID is
                the :meth:`key_id` of one of ``keys``.

        Raises:
            ConfigError: A scope is malformed, names a key id twice, or names a key that is not
                one of ``keys`` (key ``api_key_sources``).
        """
        unique = dict.fromkeys(key for key in keys if key)
        self._keys = [(_digest(key), self.key_id(key)) for key in unique]
        known = [key_id for _, key_id in self._keys]
        self._scopes: dict[str, frozenset[str]] = {}
        for entry in sources:
            try:
                key_id, allowed = parse_source_scope(entry)
            except ValueError as exc:
                raise ConfigError(
                    f"bad value for api_key_sources: {exc}", key="api_key_sources"
                ) from None
            if key_id in self._scopes:
                raise ConfigError(
                    f"api_key_sources names {key_id} twice: list all of its sources in one "
                    "entry, separated by |",
                    key="api_key_sources",
                )
            if key_id not in known:
                configured = ", ".join(known) or "none"
                raise ConfigError(
                    f"api_key_sources names {key_id}, which is not the id of any of api_keys "
                    f"(PIGEON_API_KEYS); their ids are: {configured}",
                    key="api_key_sources",
                )
            self._scopes[key_id] = allowed

    @staticmethod
    def key_id(key: str) -> str:
        """The id of a key: ``key-`` and 8 hex digits of a hash of it.

        A stable name for logs, metrics and ``api_key_sources`` that reveals nothing of the key
        and survives reordering the configured list.
        """
        return "key-" + hashlib.sha256(b"pigeon api key id:" + key.encode()).hexdigest()[:8]

    def __len__(self) -> int:
        """Number of distinct configured keys."""
        return len(self._keys)

    def scope(self, key_id: str) -> frozenset[str] | None:
        """The sources a key may publish as, or ``None`` when it may publish as any.

        Args:
            key_id: An id returned by :meth:`check`.
        """
        return self._scopes.get(key_id)

    def describe(self) -> str:
        """The configured keys by id with their scopes, for the start-up log (no secrets)."""
        described = []
        for _, key_id in self._keys:
            allowed = self._scopes.get(key_id)
            described.append(
                f"{key_id} (any source)"
                if allowed is None
                else f"{key_id} (sources {', '.join(sorted(allowed))})"
            )
        return ", ".join(described) or "none"

    def check(self, token: str | None) -> str:
        """Check a presented key.

        Args:
            token: The presented key, e.g. from :func:`bearer_token`.

        Returns:
            The id of the matching key (``key-`` + 8 hex digits of a hash of it), for logs.

        Raises:
            Unauthenticated: ``API_KEY_MISSING`` or ``API_KEY_INVALID``.
            PermissionDenied: ``TOKEN_NOT_API_KEY`` for a user or session JWT.
        """
        if not token:
            raise _fail("missing API key", "API_KEY_MISSING")
        digest = _digest(token)
        found: str | None = None
        # No early exit: the time taken must not depend on which key (if any) matched.
        for key_digest, key_id in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = key_id
        if found is None:
            if _looks_like_jwt(token):
                raise PermissionDenied(
                    "a user or session token is not an API key: system calls need an API key "
                    "from PIGEON_API_KEYS",
                    reason="TOKEN_NOT_API_KEY",
                )
            if not self._keys:
                raise _fail(
                    "invalid API key: this server has no API keys configured", "API_KEY_INVALID"
                )
            raise _fail("invalid API key", "API_KEY_INVALID")
        return found


def check_source(allowed: frozenset[str] | None, source: str, *, field: str = "source") -> None:
    """Refuse a publish as a source the caller's API key is not scoped to.

    Args:
        allowed: The caller's scope (:meth:`ApiKeys.scope`); ``None`` allows every source.
        source: The ``source`` of the publish (or of one message of its batch); empty means the
            generic sender ``system``, which a scoped key may not use either.
        field: The field's name in errors, e.g. ``batch[2].source``.

    Raises:
        PermissionDenied: ``SOURCE_NOT_ALLOWED``, naming the source and the allowed ones.
    """
    if allowed is None or source in allowed:
        return
    listed = ", ".join(sorted(allowed))
    if not source:
        raise PermissionDenied(
            f"{field} is empty, and this API key may only publish as {listed}: set {field} to "
            "one of them",
            reason="SOURCE_NOT_ALLOWED",
            field=field,
        )
    raise PermissionDenied(
        f"this API key may not publish as source {source[:MAX_NAME_LENGTH]!r}, only as {listed} "
        "(api_key_sources)",
        reason="SOURCE_NOT_ALLOWED",
        field=field,
        source=source[:MAX_NAME_LENGTH],
    )


class ClusterSecret:
    """The secret Pigeon's own processes present to each other on internal RPCs."""

    def __init__(self, secret: str) -> None:
        """Remember the secret.

        Args:
            secret: The cluster secret.

        Raises:
            ConfigError: ``secret`` is empty (internal RPCs would be open to anyone).
        """
        if not secret:
            raise ConfigError(
                "internal RPCs need a cluster secret: set cluster_secret (PIGEON_CLUSTER_SECRET)",
                key="cluster_secret",
            )
        self._digest = _digest(secret)
        self._secret = secret

    @property
    def value(self) -> str:
        """The secret, for a client to put in its ``authorization`` metadata."""
        return self._secret

    def check(self, token: str | None) -> None:
        """Check a presented secret in constant time.

        Args:
            token: The presented secret, e.g. from :func:`bearer_token`.

        Raises:
            Unauthenticated: ``CLUSTER_SECRET_MISSING`` or ``CLUSTER_SECRET_INVALID``.
        """
        if not token:
            raise _fail("missing cluster secret", "CLUSTER_SECRET_MISSING")
        if not hmac.compare_digest(_digest(token), self._digest):
            raise _fail("invalid cluster secret", "CLUSTER_SECRET_INVALID")

    def __repr__(self) -> str:
        return "ClusterSecret(***)"
