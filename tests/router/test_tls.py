"""HTTPS serving: `tls` config / --tls-cert, a real router process, certificate renewal in place."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.router import ConfigError, TLSConfig, parse_config
from router.cli import main
from router.tls import CertReloader
from tests.conftest import SimServerFactory
from tests.router.test_shutdown import free_port

HANG_GUARD_S = 30.0


def make_cert(serial: int) -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost / 127.0.0.1 with this serial, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def replace(path: Path, data: bytes) -> None:
    """Atomically, as deploy tools do: write aside, then rename over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def served_serial(port: int) -> int:
    """The serial of the certificate a new connection to the port is offered (not verified)."""
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


async def poll(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG_GUARD_S
    while not await check():
        assert time.monotonic() < deadline, f"still waiting for {what} after {HANG_GUARD_S:.0f} s"
        await asyncio.sleep(0.1)


async def test_https_router_serves_refuses_plain_http_and_reloads_a_renewed_certificate(
        sim_server: SimServerFactory, tmp_path: Path) -> None:
    engine = await sim_server()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert1, key1 = make_cert(1001)
    cert_file.write_bytes(cert1)
    key_file.write_bytes(key1)
    config = tmp_path / "router.yaml"
    config.write_text(f"tls:\n  cert_file: {cert_file}\n  key_file: {key_file}\n  reload_interval_s: 0.1\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--config", str(config), "--port", str(port),
                             "--replica", str(engine.make_url("")).rstrip("/"), "--log-level", "error"])
    base = f"https://127.0.0.1:{port}"
    trust1 = ssl.create_default_context(cafile=str(cert_file))
    try:
        async with aiohttp.ClientSession() as s:
            async def healthy() -> bool:
                assert proc.poll() is None, "the router exited"
                try:
                    async with s.get(base + "/health", ssl=trust1) as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await poll(healthy, "the router's /health over HTTPS")
            body = {"model": "sim-model", "prompt": "hello", "max_tokens": 4}
            async with s.post(base + "/v1/completions", json=body, ssl=trust1) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"]

            with pytest.raises(aiohttp.ClientError):  # plain HTTP on the HTTPS port
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    await r.read()
            with pytest.raises(aiohttp.ClientError):  # a client that does not trust the certificate
                async with s.get(base + "/health", ssl=ssl.create_default_context()) as r:
                    await r.read()

            # A broken certificate: refused, counted, the running one kept.
            replace(cert_file, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")

            async def refusal_counted() -> bool:
                async with s.get(base + "/metrics", ssl=trust1) as r:
                    text = await r.text()
                m = re.search(r'^router_tls_cert_reloads_total\{result="error"\} (\S+)$', text, re.M)
                return m is not None and float(m.group(1)) >= 1

            await poll(refusal_counted, 'router_tls_cert_reloads_total{result="error"}')
            assert await asyncio.to_thread(served_serial, port) == 1001
            async with s.get(base + "/health", ssl=trust1) as r:
                assert r.status == 200

            # The renewed pair: new connections get it.
            cert2, key2 = make_cert(2002)
            replace(key_file, key2)
            replace(cert_file, cert2)

            async def renewed() -> bool:
                return await asyncio.to_thread(served_serial, port) == 2002

            await poll(renewed, "the new certificate's serial on a new connection")
            (tmp_path / "new.crt").write_bytes(cert2)
            trust2 = ssl.create_default_context(cafile=str(tmp_path / "new.crt"))
            async with s.get(base + "/health", ssl=trust2) as r:
                assert r.status == 200
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_cert_reloader_keeps_the_running_pair_until_cert_and_key_match(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert1, key1 = make_cert(1)
    cert_file.write_bytes(cert1)
    key_file.write_bytes(key1)
    reloader = CertReloader(TLSConfig(cert_file=cert_file, key_file=key_file))
    assert reloader.check() is None  # nothing changed
    cert2, key2 = make_cert(2)
    replace(cert_file, cert2)  # the new certificate with the old key: refused
    assert reloader.check() is False
    assert reloader.check() is None  # not retried until the files change again
    replace(key_file, key2)
    assert reloader.check() is True
    assert reloader.loaded == 2


def test_a_missing_or_mismatched_cert_file_is_refused_naming_the_field(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = make_cert(7)
    _, other_key = make_cert(8)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "cert.pem").write_bytes(cert)
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConfigError, match=r"^tls\.cert_file: .*absent\.pem"):
        parse_config({"tls": {"cert_file": str(missing), "key_file": str(tmp_path / "key.pem")}})
    with pytest.raises(ConfigError, match=r"tls\.key_file: "):
        parse_config({"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(missing)}})
    with pytest.raises(ConfigError, match=r"tls: .*cert_file / key_file: do not load"):
        parse_config({"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "other.pem")}})
    with pytest.raises(ConfigError, match=r"tls\.min_version"):
        parse_config({"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem"),
                              "min_version": "SSLv3"}})
    ok = parse_config({"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem"),
                               "min_version": "TLSv1.3"}})
    assert ok.tls is not None and ok.tls.min_version == "TLSv1.3"

    # The CLI: the same message, exit 2, and both flags needed.
    assert main(["--replica", "http://127.0.0.1:1", "--tls-cert", str(missing), "--tls-key",
                 str(tmp_path / "key.pem")]) == 2
    assert "tls.cert_file: " in capsys.readouterr().err
    assert main(["--replica", "http://127.0.0.1:1", "--tls-cert", str(tmp_path / "cert.pem")]) == 2
    assert "--tls-key" in capsys.readouterr().err
