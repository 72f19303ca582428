"""Certificates described the way ``ssl.SSLObject.getpeercert()`` does.

:func:`describe_certificate` turns a verified peer certificate into the
dictionary the standard library's ``getpeercert()`` returns, so that
code written for ``ssl`` reads mptls's peer the same way. It only reads
the certificate; it must never verify one, nor be asked about a peer
that was not verified.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

_MONTHS = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


def describe_certificate(certificate: x509.Certificate) -> dict[str, Any]:
    """A certificate as ``ssl.SSLObject.getpeercert()`` shows one."""
    described: dict[str, Any] = {
        "subject": _name_tuple(certificate.subject),
        "issuer": _name_tuple(certificate.issuer),
        "version": certificate.version.value + 1,
        "serialNumber": _serial_text(certificate.serial_number),
        "notBefore": _time_text(certificate.not_valid_before_utc),
        "notAfter": _time_text(certificate.not_valid_after_utc),
    }
    extensions = certificate.extensions
    try:
        names = extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        pass
    else:
        described["subjectAltName"] = tuple(
            _general_name(name) for name in names
        )
    described.update(_access_locations(extensions))
    return described


def _attribute_name(oid: x509.ObjectIdentifier) -> str:
    # OpenSSL's long names, as the ssl module reports them
    nid = _lib.OBJ_txt2nid(oid.dotted_string.encode("ascii"))
    if nid == 0:
        return oid.dotted_string
    long_name: bytes = _ffi.string(_lib.OBJ_nid2ln(nid))
    return long_name.decode("ascii")


def _name_tuple(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(
        tuple(
            (_attribute_name(attribute.oid), _attribute_text(attribute))
            for attribute in rdn
        )
        for rdn in name.rdns
    )


def _attribute_text(attribute: x509.NameAttribute[Any]) -> str:
    value = attribute.value
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _serial_text(serial: int) -> str:
    # two hex digits per byte, as OpenSSL's i2a_ASN1_INTEGER prints it
    sign = "-" if serial < 0 else ""
    magnitude = abs(serial)
    length = max(1, (magnitude.bit_length() + 7) // 8)
    return sign + magnitude.to_bytes(length, "big").hex().upper()


def _time_text(moment: datetime.datetime) -> str:
    # ASN1_TIME_print's layout: "Jan  5 09:34:43 2018 GMT"
    return (
        f"{_MONTHS[moment.month - 1]} {moment.day:2d} "
        f"{moment:%H:%M:%S} {moment.year} GMT"
    )


def _ip_text(address: Any) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        groups = address.packed
        return ":".join(
            f"{int.from_bytes(groups[i : i + 2], 'big'):X}"
            for i in range(0, 16, 2)
        )
    return str(address)


def _general_name(name: x509.GeneralName) -> tuple[str, Any]:
    if isinstance(name, x509.DNSName):
        return "DNS", name.value
    if isinstance(name, x509.IPAddress):
        return "IP Address", _ip_text(name.value)
    if isinstance(name, x509.RFC822Name):
        return "email", name.value
    if isinstance(name, x509.UniformResourceIdentifier):
        return "URI", name.value
    if isinstance(name, x509.DirectoryName):
        return "DirName", _name_tuple(name.value)
    if isinstance(name, x509.RegisteredID):
        return "Registered ID", _attribute_name(name.value)
    return "othername", "<unsupported>"


def _access_locations(extensions: x509.Extensions) -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        access = extensions.get_extension_for_class(
            x509.AuthorityInformationAccess
        ).value
    except x509.ExtensionNotFound:
        access = None
    if access is not None:
        for key, method in (
            ("OCSP", AuthorityInformationAccessOID.OCSP),
            ("caIssuers", AuthorityInformationAccessOID.CA_ISSUERS),
        ):
            uris = tuple(
                d.access_location.value
                for d in access
                if d.access_method == method
                and isinstance(
                    d.access_location, x509.UniformResourceIdentifier
                )
            )
            if uris:
                found[key] = uris
    try:
        points = extensions.get_extension_for_class(
            x509.CRLDistributionPoints
        ).value
    except x509.ExtensionNotFound:
        return found
    uris = tuple(
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    )
    if uris:
        found["crlDistributionPoints"] = uris
    return found
