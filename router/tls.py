"""HTTPS serving: the listening socket's `ssl.SSLContext`, and its certificate renewed in place.

The context is built once and handed to aiohttp's `TCPSite`. `CertReloader` checks the certificate and
key files every ``tls.reload_interval_s`` (their mtime, size and inode, so a rename or a symlink flip as
cert-manager and Kubernetes Secrets do it counts too). A changed pair is first copied to a private
temporary directory (so both files are read once, and a writer half-way through is not read twice),
loaded into a scratch context to prove it is a certificate with its own key, and only then loaded into
the live context with `SSLContext.load_cert_chain`, which applies to new connections; connections already
open keep theirs. A pair that does not load keeps the running certificate: the error is logged and
counted in ``router_tls_cert_reloads_total{result="error"}``, and the files are looked at again when they
change next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path

from prometheus_client import Counter

from config.router import TLSConfig

log = logging.getLogger("router.tls")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _new_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # server side: no client certificates asked
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    return ctx


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertReloader:
    """Owns the server `SSLContext` of a `TLSConfig`; `check()` reloads a changed certificate into it."""

    def __init__(self, cfg: TLSConfig, counter: Counter | None = None) -> None:
        self.cfg = cfg
        self.counter = counter
        self.context = _new_context(cfg)
        self._stamps = self._read_stamps()
        self.context.load_cert_chain(cfg.cert_file, cfg.key_file)  # the config validated it already
        self.loaded = 1  # pairs loaded so far, the first included

    def _read_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.cfg.cert_file), _stamp(self.cfg.key_file))

    def changed(self) -> bool:
        stamps = self._read_stamps()
        return None not in stamps and stamps != self._stamps

    def check(self) -> bool | None:
        """Reload the pair if the files changed. None: unchanged; True: loaded; False: refused."""
        if not self.changed():
            return None
        self._stamps = self._read_stamps()  # a bad pair is retried only when the files change again
        with tempfile.TemporaryDirectory(prefix="router-tls-") as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            try:
                shutil.copyfile(self.cfg.cert_file, cert)
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out, self.cfg.key_file.open("rb") as src:
                    shutil.copyfileobj(src, out)
                _new_context(self.cfg).load_cert_chain(cert, key)  # proves the pair before touching live
                self.context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS certificate %s / key %s changed but do not load, keeping the running "
                          "certificate: %s", self.cfg.cert_file, self.cfg.key_file, exc)
                if self.counter is not None:
                    self.counter.labels("error").inc()
                return False
        self.loaded += 1
        if self.counter is not None:
            self.counter.labels("ok").inc()
        log.info("TLS certificate reloaded from %s", self.cfg.cert_file)
        return True

    async def watch(self) -> None:
        """Check every ``reload_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                self.check()  # on the loop: the live context is never changed while a handshake uses it
            except Exception:  # never let one bad tick end the watch
                log.exception("TLS certificate check failed")
