"""TLS for a deployment's NATS: a CA of its own and one certificate for its servers (clients and
the cluster's routes), made with ``cryptography``, short-lived, naming the hosts the servers
answer at in compose, Kubernetes and on this machine. ``make secrets`` writes them to ``.tls/``
(git ignores it); nats.conf reads their paths from the environment, every client verifies the
server against the CA (``NATS_TLS_CA``). Embedded runs stay on 127.0.0.1 without TLS.

    python -m tuneloop.tls .tls [--days 90] [--host extra.example.org ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

CA, CA_KEY, SERVER, SERVER_KEY = "ca.pem", "ca-key.pem", "server.pem", "server-key.pem"
# Where the servers answer: compose's three nodes, the StatefulSet's pods and services in the
# tuneloop namespace, and this machine (tests, port-forwards).
HOSTS = ("nats", "nats-2", "nats-3", "nats-cluster", "nats-0.nats-cluster", "nats-1.nats-cluster", "nats-2.nats-cluster",
         "*.nats-cluster", "*.nats-cluster.tuneloop.svc", "*.nats-cluster.tuneloop.svc.cluster.local",
         "nats.tuneloop.svc", "nats.tuneloop.svc.cluster.local", "localhost", "127.0.0.1", "::1")


def make_certificates(folder: Path, hosts: tuple[str, ...] = HOSTS, days: int = 90) -> dict[str, Path]:
    """A new CA and a server certificate it signed, for ``hosts`` (names and addresses), valid
    ``days`` days; keys readable by their owner only. Returns the files by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tuneloop NATS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tuneloop NATS")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              # routes: every node is the server of some routes and the client of the others
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {CA: ca.public_bytes(pem), SERVER: server.public_bytes(pem),
             CA_KEY: ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
             SERVER_KEY: key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    out = {}
    for name, data in files.items():
        path = folder / name
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name.endswith("key.pem") else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
        out[name] = path
    return out


def server_env(folder: Path) -> dict[str, str]:
    """What nats.conf reads: the paths of the server's certificate, its key and the CA."""
    folder = Path(folder)
    return {"NATS_TLS_SERVER_CERT": str(folder / SERVER), "NATS_TLS_SERVER_KEY": str(folder / SERVER_KEY),
            "NATS_TLS_SERVER_CA": str(folder / CA)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuneloop.tls", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--days", type=int, default=90, help="how long the certificates are valid (default 90)")
    ap.add_argument("--host", action="append", default=[], help="one more name or address the servers answer at")
    args = ap.parse_args(argv)
    made = make_certificates(args.folder, (*HOSTS, *args.host), args.days)
    print(f"wrote {', '.join(str(p) for p in made.values())} (valid {args.days} days)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
