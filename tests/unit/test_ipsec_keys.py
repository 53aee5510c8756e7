"""IPsec keys: HKDF (RFC 5869), per node-pair derivation, validation, key files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, PermissionDenied
from services.ipsec.keys import Cipher, Key, check_node_id, check_spi, hkdf_sha256, read_key_file, write_key_file

GCM = bytes(range(20))


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_hkdf_matches_rfc5869_test_case_3_empty_salt_and_info() -> None:
    okm = hkdf_sha256(b"\x0b" * 22, b"", b"", 42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_every_direction_of_every_pair_gets_its_own_key() -> None:
    key = Key(3, Cipher.GCM, GCM)
    derived = {(s, d): key.pair_algorithm(s, d).key for s in range(1, 6) for d in range(1, 6) if s != d}
    assert len(set(derived.values())) == len(derived)
    assert all(len(k) == len(GCM) and k != GCM for k in derived.values())
    assert key.pair_algorithm(1, 2).key == Key(3, Cipher.GCM, GCM).pair_algorithm(1, 2).key  # both ends agree
    assert Key(4, Cipher.GCM, GCM).pair_algorithm(1, 2).key != derived[(1, 2)]  # and per key index


def test_cbc_hmac_derives_a_cipher_and_an_auth_key() -> None:
    alg = Key(1, Cipher.CBC_HMAC, bytes(32)).pair_algorithm(1, 2)
    assert alg.name == "cbc(aes)" and alg.auth_name == "hmac(sha256)"
    assert len(alg.key) == 32 and len(alg.auth_key) == 32 and alg.key != alg.auth_key
    assert alg.auth_trunc_bits == 128 and alg.icv_bits == 0


@pytest.mark.parametrize(("cipher", "length"), [(Cipher.GCM, 16), (Cipher.GCM, 19), (Cipher.CBC_HMAC, 20)])
def test_a_key_of_the_wrong_length_is_refused(cipher: Cipher, length: int) -> None:
    with pytest.raises(InvalidArgument, match="bytes long"):
        Key(1, cipher, bytes(length))


@pytest.mark.parametrize("spi", [0, 16, -1, 1 << 32])
def test_spi_outside_1_to_15_is_refused(spi: int) -> None:
    with pytest.raises(InvalidArgument, match=r"1\.\.15"):
        check_spi(spi)


def test_node_ids_are_1_to_65535() -> None:
    assert check_node_id(1) == 1 and check_node_id(65535) == 65535
    for bad in (0, 65536):
        with pytest.raises(InvalidArgument):
            check_node_id(bad)


def test_a_key_never_prints_its_secret() -> None:
    key = Key(1, Cipher.GCM, GCM)
    alg = key.pair_algorithm(1, 2)
    for text in (repr(key), str(key), repr(alg)):
        assert GCM.hex() not in text and alg.key.hex() not in text and "secret=" not in text


def test_key_files_are_written_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_file(path, Key(7, Cipher.GCM, GCM))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_key_file(path) == Key(7, Cipher.GCM, GCM)


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_file(path, Key(7, Cipher.GCM, GCM))
    path.chmod(0o644)
    with pytest.raises(PermissionDenied, match="chmod 600") as info:
        read_key_file(path)
    assert GCM.hex() not in str(info.value)


def test_a_key_file_that_is_a_directory_is_invalid_argument(tmp_path: Path) -> None:
    """The fuzz test found it: fdopen refused the directory with its own error (INTERNAL)."""
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_key_file(tmp_path / "d")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1 rfc4106(gcm(aes))", "expected one line"),
        ("x rfc4106(gcm(aes)) 00", "expected one line"),
        ("1 rfc4106(gcm(aes)) zz", "not hexadecimal"),
        ("1 des 00", "unknown cipher"),
        (f"0 rfc4106(gcm(aes)) {GCM.hex()}", "1..15"),
    ],
)
def test_malformed_key_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "k"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(InvalidArgument, match=match):
        read_key_file(path)


def test_pair_key_layout_for_gcm_carries_the_salt_in_the_key_length() -> None:
    attrs = Key(1, Cipher.GCM, GCM).pair_algorithm(1, 2).attrs()
    assert [name for name, _ in attrs] == ["XFRMA_ALG_AEAD"]
    raw = attrs[0][1]
    name, key_bits, icv_bits = struct.unpack("=64sII", raw[:72])
    assert name.rstrip(b"\0") == b"rfc4106(gcm(aes))" and key_bits == 160 and icv_bits == 128
    assert len(raw) == 72 + 20
