"""IPsec keys: algorithms, key files, and per node-pair keys derived with HKDF.

The operator gives one cluster key per key index (the SPI, 1..15). Every
direction between two nodes gets its own key, derived from it with HKDF-SHA256
(RFC 5869) over the SPI and the two node ids, so no two node pairs (and no two
directions) share a key, and both ends derive the same one without talking. A
`Key` never prints its bytes; nothing outside this module and the xfrm messages
sees them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from services.common.errors import InvalidArgument, PermissionDenied
from services.ipsec.defs import MAX_NODE_ID, MAX_SPI, MIN_SPI
from services.ipsec.xfrm import Algorithm

HKDF_SALT = b"weir-ipsec-v1"
MAX_KEY_FILE_BYTES = 4096


class Cipher(Enum):
    """The algorithms a key may be for, with the kernel option each needs."""

    GCM = "rfc4106(gcm(aes))"
    CBC_HMAC = "cbc(aes)+hmac(sha256)"

    @property
    def key_lengths(self) -> tuple[int, ...]:
        """Valid cluster key lengths in bytes: GCM carries a 4-byte salt after the AES key."""
        return (20, 28, 36) if self is Cipher.GCM else (16, 24, 32)

    @property
    def kernel_option(self) -> str:
        return "CONFIG_CRYPTO_GCM" if self is Cipher.GCM else "CONFIG_CRYPTO_CBC and CONFIG_CRYPTO_SHA256"

    def max_inner(self, mtu: int, outer_version: int) -> int:
        """The largest packet that still fits `mtu` once ESP in tunnel mode has wrapped it.

        ESP adds the outer IP header, its own header (SPI, sequence number), the IV, a
        trailer (padding to the cipher's block, pad length, next header) and the ICV; the
        kernel's esp4/esp6 get_mtu compute the same bound.
        """
        iv, block = (GCM_IV_BYTES, GCM_ALIGN) if self is Cipher.GCM else (CBC_IV_BYTES, CBC_BLOCK)
        icv = (ICV_BITS if self is Cipher.GCM else AUTH_TRUNC_BITS) // 8
        fixed = (IPV4_HEADER if outer_version == 4 else IPV6_HEADER) + ESP_HEADER + iv + icv
        return (mtu - fixed) // block * block - ESP_TRAILER


ICV_BITS = 128
AUTH_KEY_BYTES = 32
AUTH_TRUNC_BITS = 128
IPV4_HEADER, IPV6_HEADER = 20, 40
ESP_HEADER = 8  # SPI and sequence number
ESP_TRAILER = 2  # pad length and next header
GCM_IV_BYTES, GCM_ALIGN = 8, 4  # RFC 4106: an 8-byte IV; ESP pads to 4 bytes
CBC_IV_BYTES, CBC_BLOCK = 16, 16  # AES-CBC: the IV and the padding are one AES block


@dataclass(frozen=True)
class Key:
    """One cluster key: its index (the SPI on the wire), cipher and secret."""

    spi: int
    cipher: Cipher
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_spi(self.spi)
        if len(self.secret) not in self.cipher.key_lengths:
            lengths = ", ".join(str(n) for n in self.cipher.key_lengths)
            raise InvalidArgument(
                f"a {self.cipher.value} key must be {lengths} bytes long, got {len(self.secret)} bytes"
            )

    def pair_algorithm(self, src_node: int, dst_node: int) -> Algorithm:
        """The xfrm algorithm (with the derived key) for traffic from node `src_node` to `dst_node`."""
        info = f"spi={self.spi} {src_node}->{dst_node}".encode()
        key = hkdf_sha256(self.secret, HKDF_SALT, info, len(self.secret))
        if self.cipher is Cipher.GCM:
            return Algorithm(Cipher.GCM.value, key, icv_bits=ICV_BITS)
        auth = hkdf_sha256(self.secret, HKDF_SALT, info + b" auth", AUTH_KEY_BYTES)
        return Algorithm("cbc(aes)", key, auth_name="hmac(sha256)", auth_key=auth, auth_trunc_bits=AUTH_TRUNC_BITS)


def check_spi(spi: int) -> int:
    if not MIN_SPI <= spi <= MAX_SPI:
        raise InvalidArgument(f"spi {spi} is out of range: key indexes (SPIs) are {MIN_SPI}..{MAX_SPI}")
    return spi


def check_node_id(node_id: int, where: str = "node_id") -> int:
    if not 1 <= node_id <= MAX_NODE_ID:
        raise InvalidArgument(f"{where} {node_id} is out of range: node ids are 1..{MAX_NODE_ID}")
    return node_id


def cipher_named(name: str) -> Cipher:
    for cipher in Cipher:
        if name in (cipher.value, cipher.name, cipher.name.lower()):
            return cipher
    raise InvalidArgument(f"unknown cipher {name[:64]!r}: use {' or '.join(c.value for c in Cipher)}")


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256: extract, then expand to `length` bytes."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 gives at most 8160 bytes")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def parse_key_text(text: str, where: str) -> Key:
    """`SPI CIPHER HEXKEY` on one line (the cipher as `rfc4106(gcm(aes))` or `cbc(aes)+hmac(sha256)`)."""
    parts = text.split()
    if len(parts) != 3 or not parts[0].isdigit():
        raise InvalidArgument(
            f"{where}: expected one line 'SPI CIPHER HEXKEY', e.g. '1 rfc4106(gcm(aes)) <40 hex digits>'"
        )
    try:
        secret = bytes.fromhex(parts[2])
    except ValueError:
        raise InvalidArgument(f"{where}: the key is not hexadecimal") from None
    return Key(int(parts[0]), cipher_named(parts[1]), secret)


def read_key_file(path: Path) -> Key:
    """Read a key file; refused unless it is a regular file only its owner may read or write (0600 or 0400)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InvalidArgument(f"key file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"key file {path} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise InvalidArgument(f"key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_mode & 0o077:
            raise PermissionDenied(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it; "
                f"make it readable by its owner only (chmod 600 {path}) and try again"
            )
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidArgument(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    return parse_key_text(data.decode("ascii", errors="replace"), f"key file {path}")


def write_key_file(path: Path, key: Key) -> None:
    """Write a key file with mode 0600, atomically (never readable by others, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{key.spi} {key.cipher.value} {key.secret.hex()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
