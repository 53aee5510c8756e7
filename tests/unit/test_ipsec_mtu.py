"""The overlay MTU with room for ESP: the largest packet each cipher's ESP still fits in the underlay."""

from __future__ import annotations

import pytest

from services.ipsec.keys import Cipher
from services.ipsec.mtu import encrypted_overlay_mtu


def esp_length(cipher: Cipher, inner: int, outer_version: int) -> int:
    """What ESP in tunnel mode makes of an `inner`-byte packet (RFC 4303 layout, RFC 4106 / AES-CBC sizes)."""
    iv, block, icv = (8, 4, 16) if cipher is Cipher.GCM else (16, 16, 16)
    outer = 20 if outer_version == 4 else 40
    padded = -(-(inner + 2) // block) * block  # payload, padding, pad length and next header
    return outer + 8 + iv + padded + icv


@pytest.mark.parametrize("cipher", list(Cipher))
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mtu", [1280, 1400, 1500, 1501, 1502, 1503, 9000])
def test_max_inner_is_the_largest_packet_that_fits(cipher: Cipher, version: int, mtu: int) -> None:
    largest = cipher.max_inner(mtu, version)
    assert esp_length(cipher, largest, version) <= mtu
    assert esp_length(cipher, largest + 1, version) > mtu


def test_the_overlay_mtu_on_a_1500_byte_underlay() -> None:
    # GCM over IPv4: 1500 - 20 outer - 8 ESP - 8 IV - 16 ICV = 1448 (a multiple of 4), less the
    # 2 trailer bytes = 1446 of VXLAN packet, less the 50 of VXLAN = 1396
    assert encrypted_overlay_mtu(1500, 4, [Cipher.GCM]) == 1396
    assert encrypted_overlay_mtu(1500, 4, [Cipher.CBC_HMAC]) == 1388
    # holding keys of both ciphers (a rotation between them): the smaller fits both
    assert encrypted_overlay_mtu(1500, 4, [Cipher.GCM, Cipher.CBC_HMAC]) == 1388
    assert encrypted_overlay_mtu(1500, 6, [Cipher.GCM]) == 1426 - 70
