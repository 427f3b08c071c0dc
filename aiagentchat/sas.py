"""Emoji verification (SAS) that today's clients accept: three fixes to matrix-nio 0.26, which only ever
verified with nio.

- The commitment (the accepting side's hash of its public key and the start message) is the SHA-256 in unpadded
  base64, not in hex as nio writes and checks it: Element (matrix-rust-sdk) cancels with `m.key_mismatch` as
  soon as nio's key arrives.
- nio offers and picks the MAC method `hkdf-hmac-sha256` but computes it with vodozemac's `calculate_mac`, whose
  base64 is correct. The spec's `hkdf-hmac-sha256` is libolm's, with its base64 bug (vodozemac keeps it as
  `calculate_mac_invalid_base64`); the correct base64 is `hkdf-hmac-sha256.v2`. nio is made to prefer the
  latter (offered first, required of a peer that starts) and to compute each method as the spec defines it.
- The emoji: vodozemac's `emoji_indices` are already the seven 6-bit numbers, which nio cuts into 6-bit pieces
  again, so nio shows other emoji than Element for the same secret.

And one addition: a Sas given `own_master_key` (the bot's cross-signing master key) also MACs that key, as
Element does, so the other side verifies the bot's identity, not only its device.

`use_spec_sas` patches nio's Sas class; re-check both on any nio upgrade (docs/encryption.md).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from nio import Api
from nio.crypto import Sas

LEGACY = "hkdf-hmac-sha256"
V2 = "hkdf-hmac-sha256.v2"


class _SpecMac:
    """vodozemac's EstablishedSas, its `calculate_mac` as the chosen MAC method defines it."""

    def __init__(self, established: Any, legacy: bool) -> None:
        self._established = established
        self._legacy = legacy

    def calculate_mac(self, text: str, info: str) -> str:
        if self._legacy:
            return self._established.calculate_mac_invalid_base64(text, info)
        return self._established.calculate_mac(text, info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._established, name)


def _get(sas: Sas) -> Any:
    established = sas.__dict__.get("_established_sas")
    return None if established is None else _SpecMac(established, sas.chosen_mac_method == LEGACY)


def _set(sas: Sas, value: Any) -> None:
    sas.__dict__["_established_sas"] = value


def commitment(public_key: str, start_content: dict[str, Any]) -> str:
    digest = hashlib.sha256(public_key.encode() + Api.to_canonical_json(start_content).encode()).digest()
    return base64.b64encode(digest).decode().rstrip("=")


_from_start = Sas.from_key_verification_start.__func__


def _accepting(cls: type[Sas], *args: Any, **kwargs: Any) -> Sas:
    sas = _from_start(cls, *args, **kwargs)
    event = kwargs.get("event", args[-1] if args else None)
    sas.commitment = commitment(sas.pubkey, event.source["content"])
    return sas


def _check_commitment(sas: Sas, key: str) -> bool:
    return sas.commitment == commitment(key, sas.start_verification().content)


def _generate_emoji(sas: Sas, extra_info: str) -> list[tuple[str, str]]:
    return [sas.emoji[index] for index in sas.established_sas.bytes(extra_info).emoji_indices]


_get_mac = Sas.get_mac


def _get_mac_with_master(sas: Sas) -> Any:
    message = _get_mac(sas)
    master = getattr(sas, "own_master_key", None)
    if master is None:
        return message
    other = sas.other_olm_device
    info = (f"MATRIX_KEY_VERIFICATION_MAC{sas.own_user}{sas.own_device}{other.user_id}{other.id}"
            f"{sas.transaction_id}")  # fmt: skip
    calculate_mac = sas.established_sas.calculate_mac
    mac = dict(message.content["mac"])
    mac[f"ed25519:{master}"] = calculate_mac(master, f"{info}ed25519:{master}")
    message.content["mac"] = mac
    message.content["keys"] = calculate_mac(",".join(sorted(mac)), info + "KEY_IDS")
    return message


def use_spec_sas() -> None:
    """Patch nio's Sas class (once per process; every Sas made afterwards and before)."""
    Sas._mac_normal = V2
    Sas._mac_v1 = [V2, LEGACY]
    Sas.established_sas = property(_get, _set)
    Sas.from_key_verification_start = classmethod(_accepting)
    Sas._check_commitment = _check_commitment
    Sas._generate_emoji = _generate_emoji
    Sas.get_mac = _get_mac_with_master
