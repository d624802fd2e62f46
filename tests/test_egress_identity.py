"""A restored sandbox's gateway keeps the placeholders and CA its processes hold, and takes
nothing it should not (moat.egress.identity)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from moat.egress import Gateway, Secret
from moat.egress.identity import GATEWAY_FILE, GatewayIdentity

SECRETS = {
    "API_KEY": Secret("value-one-0123456789", ["api.example.com"]),
    "OTHER": Secret("value-two-0123456789", ["other.example.com"]),
}


def _saved(tmp_path: Path, gw: Gateway) -> GatewayIdentity:
    gw.identity().save(tmp_path)
    assert (tmp_path / GATEWAY_FILE).stat().st_mode & 0o777 == 0o600
    text = (tmp_path / GATEWAY_FILE).read_text()
    assert "value-one" not in text and "value-two" not in text  # no secret value in it
    loaded = GatewayIdentity.load(tmp_path)
    assert loaded is not None
    return loaded


def test_placeholders_and_ca_are_kept(tmp_path: Path) -> None:
    first = Gateway("sbx-first", secrets=SECRETS)
    second = Gateway("sbx-second", secrets=SECRETS, identity=_saved(tmp_path, first))
    assert second.placeholders() == first.placeholders()
    assert second.ca_cert_pem() == first.ca_cert_pem()
    # positive control: without the identity a gateway draws its own
    fresh = Gateway("sbx-third", secrets=SECRETS)
    assert fresh.placeholders()["API_KEY"] != first.placeholders()["API_KEY"]
    assert fresh.ca_cert_pem() != first.ca_cert_pem()


def test_a_ca_for_other_hosts_is_not_taken(tmp_path: Path) -> None:
    """A CA constrained to other names than the secrets' bound hosts now is replaced: it
    could sign for hosts this sandbox has no secret for (or miss one it has)."""
    first = Gateway("sbx-first", secrets=SECRETS)
    saved = _saved(tmp_path, first)
    wider = {**SECRETS, "THIRD": Secret("value-three-0123456789", ["third.example.com"])}
    second = Gateway("sbx-second", secrets=wider, identity=saved)
    assert second.ca_cert_pem() != first.ca_cert_pem()
    names = x509.load_pem_x509_certificate(second.ca_cert_pem()).extensions.get_extension_for_class(
        x509.NameConstraints
    )
    assert {n.value for n in names.value.permitted_subtrees or ()} == {
        "api.example.com",
        "other.example.com",
        "third.example.com",
    }
    # the placeholders of the secrets it had are kept; the new one draws its own
    assert second.placeholders()["API_KEY"] == first.placeholders()["API_KEY"]
    assert second.placeholders()["THIRD"] not in first.placeholders().values()


def test_a_tampered_identity_is_not_taken(tmp_path: Path) -> None:
    first = Gateway("sbx-first", secrets=SECRETS)
    saved = _saved(tmp_path, first)
    other = Gateway("sbx-other", secrets=SECRETS).identity()
    # a key that is not the certificate's
    mixed = GatewayIdentity(saved.placeholders, other.ca_key_pem, saved.ca_cert_pem)
    assert Gateway("s1", secrets=SECRETS, identity=mixed).ca_cert_pem() not in (
        saved.ca_cert_pem,
        other.ca_cert_pem,
    )
    # placeholders of the wrong shape, or one placeholder for two names
    bad = GatewayIdentity({"API_KEY": "not-a-placeholder", "OTHER": "moat-ph-" + "0" * 31})
    got = Gateway("s2", secrets=SECRETS, identity=bad).placeholders()
    assert got["API_KEY"] != "not-a-placeholder" and got["OTHER"] != "moat-ph-" + "0" * 31
    one = saved.placeholders["API_KEY"]
    twice = GatewayIdentity({"API_KEY": one, "OTHER": one})
    got = Gateway("s3", secrets=SECRETS, identity=twice).placeholders()
    assert got["API_KEY"] == one and got["OTHER"] != one


def test_unreadable_or_malformed_files_give_none(tmp_path: Path) -> None:
    assert GatewayIdentity.load(tmp_path) is None  # none saved
    path = tmp_path / GATEWAY_FILE
    for text in ("{", "[]", json.dumps({"version": 2}), "x" * (70 * 1024)):
        path.write_text(text)
        assert GatewayIdentity.load(tmp_path) is None, text[:20]
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    assert GatewayIdentity.load(tmp_path) is None  # never followed
    # a version-1 file with junk fields keeps only what is well formed
    path.unlink()
    path.write_text(json.dumps({"version": 1, "placeholders": {"1bad": "moat-ph-" + "a" * 32},
                                "ca_key": 5, "ca_cert": None}))  # fmt: skip
    assert GatewayIdentity.load(tmp_path) == GatewayIdentity()
