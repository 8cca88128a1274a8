"""A throwaway Dovecot IMAP server for tests and benchmarks.

:class:`DovecotServer` writes a self-contained config into a ``tempfile.mkdtemp()`` folder
(nothing is read from ``/etc/dovecot``), runs ``dovecot -F -c FILE`` as a child process on a
free loopback port and waits for the IMAP greeting. Each user has a passwd-file of its own
(``users/NAME``), so :meth:`DovecotServer.add_user` works while the server runs: Dovecot
checks a passwd-file for changes at most once a second, so one shared file would miss a user
added within a second of the last login, but a new file is read on its first use.

Invariants and the measured reasons for them (see ``/work/shared/FACTS.md``):

* the folder is mode 0755, because the auth process runs as ``dovecot`` and must reach the
  users file (pytest's ``tmp_path`` is 0700 and fails with "Temporary authentication
  failure");
* every mail user is uid/gid 65534 (Dovecot refuses uid 0) and owns its home folder;
* ``mail_fsync = never``: APPEND is about twice as fast, and the data is thrown away anyway;
* with ``tls=True`` a self-signed certificate for ``127.0.0.1``/``localhost`` is made with
  ``openssl req -x509``; the server then offers STARTTLS on :attr:`port` and implicit TLS on
  :attr:`ssl_port`, and :meth:`ssl_context` trusts that certificate.
* with ``oauth2_introspection_url`` it also takes ``AUTHENTICATE XOAUTH2``/``OAUTHBEARER``,
  Dovecot's ``oauth2`` passdb POSTing each token to that URL (RFC 7662 introspection; see
  :class:`helpdesk.testing.oauth.IntrospectionServer`); Debian's dovecot-core has the
  driver built in.

Requires root (to chown mail folders) and the ``dovecot`` binary
(``scripts/ensure-services.sh`` installs it). Usable as a context manager::

    with DovecotServer() as server:
        server.add_user("alice", "secret")
        server.append("alice", "secret", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MAIL_UID = 65534  # "nobody": Dovecot refuses uid 0 for mail users
MAIL_GID = 65534


class DovecotError(RuntimeError):
    """The test Dovecot could not be started, configured or driven."""


@dataclass(frozen=True, slots=True)
class ImapAccount:
    """Where and as whom to log in: what a test needs to build a mailbox client."""

    host: str
    port: int
    user: str
    password: str


def _quote(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class _Wire:
    """Just enough of an IMAP client to pipeline APPENDs (see ``append_many``)."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=30)
        self._file = self._sock.makefile("rb")
        greeting = self._file.readline()
        if not greeting.startswith(b"* OK"):
            self.close()
            raise DovecotError(f"unexpected greeting {greeting!r}")

    def __enter__(self) -> _Wire:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def command(self, line: bytes) -> None:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        self.expect_ok([tag])

    def expect_ok(self, tags: list[bytes]) -> None:
        """Read until every tag has answered; raise unless all said OK."""
        waiting = set(tags)
        while waiting:
            line = self._file.readline()
            if not line:
                raise DovecotError("connection closed while waiting for " + repr(waiting))
            tag, _, rest = line.partition(b" ")
            if tag in waiting:
                waiting.discard(tag)
                if not rest.startswith(b"OK"):
                    raise DovecotError(f"{tag.decode()} failed: {rest.strip()!r}")


def dovecot_binary() -> str | None:
    """Path of the ``dovecot`` binary, or None when it is not installed."""
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.path.exists(p)), None
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (a small race, retried by :meth:`start`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


_CONFIG = """\
# Written by helpdesk.testing.dovecot; self-contained, reads nothing from /etc/dovecot.
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = {host}
default_internal_user = dovecot
default_login_user = dovenull
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
auth_failure_delay = 0
first_valid_uid = {uid}
mail_location = maildir:~/Maildir
mail_fsync = never
{ssl}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = {root}/users/%u{passwd_mechanisms}
}}
userdb {{
  driver = passwd-file
  args = {root}/users/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Processed {{
    auto = create
  }}
}}
# Failed logins from one IP make Dovecot delay later logins from it (up to 15 s), which
# would slow every test after a bad-password test: the auth process cannot reach anvil's
# penalty socket, so penalties are off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {ssl_port}
  }}
}}
"""


# With ``oauth2_introspection_url``: XOAUTH2/OAUTHBEARER logins are checked by asking that
# endpoint (RFC 7662 introspection, the token POSTed as ``token=…``), and only by it: the
# passwd-file passdb is limited to PLAIN/LOGIN, so a refused token is never tried as a
# password. The passwd-file userdb still gives the mail user its home.
_OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""
_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = {url}
username_attribute = username
username_format = %u
active_attribute = active
active_value = true
timeout_msecs = 5000
"""


# A self-signed EC certificate valid for 127.0.0.1 and localhost, good for two days.
_OPENSSL_ARGS = (
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-days", "2", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
)  # fmt: skip


class DovecotServer:
    """A Dovecot child process with its own config, users and mail, all in one temp folder."""

    def __init__(
        self, *, tls: bool = False, host: str = "127.0.0.1", oauth2_introspection_url: str = ""
    ) -> None:
        self.host = host
        self.tls = tls
        self.oauth2_introspection_url = oauth2_introspection_url
        self.port = 0
        self.ssl_port = 0
        self.root = Path(tempfile.mkdtemp(prefix="helpdesk-dovecot-"))
        self.root.chmod(0o755)
        self.config_path = self.root / "dovecot.conf"
        self.users_path = self.root / "users"
        self.cert_path = self.root / "cert.pem"
        self.key_path = self.root / "key.pem"
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()

    def start(self, *, timeout: float = 10.0) -> None:
        """Write the config and run Dovecot; return once it greets on :attr:`port`.

        The ports are kept across :meth:`restart`, so clients can reconnect to the same place.
        """
        binary = dovecot_binary()
        if binary is None:
            raise DovecotError("dovecot is not installed (run scripts/ensure-services.sh)")
        if self._process is not None:
            raise DovecotError("already running")
        for folder in ("run", "state", "home"):
            (self.root / folder).mkdir(mode=0o755, exist_ok=True)
        self.users_path.mkdir(mode=0o755, exist_ok=True)
        if self.tls and not self.cert_path.exists():
            self._make_certificate()
        fresh_ports = self.port == 0
        for attempt in range(5):
            if fresh_ports:
                self.port = free_port(self.host)
                self.ssl_port = free_port(self.host) if self.tls else 0
            self._write_config()
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                self._wait_for_greeting(timeout)
                return
            except DovecotError:
                self._reap()
                if not fresh_ports or attempt == 4:
                    raise

    def stop(self) -> None:
        """SIGTERM Dovecot and wait for it (it stops in well under a second)."""
        self._reap()

    def restart(self) -> None:
        """Stop and start again on the same ports, keeping users and mail."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Remove the temp folder (config, users, mail). Call after :meth:`stop`."""
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of Dovecot's log, for error messages."""
        try:
            text = (self.root / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- users and mail -----------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a mail user; works while the server runs (the passwd-file is re-read)."""
        if not name or any(c in name for c in ":/%\n") or any(c in password for c in ":\n"):
            raise ValueError(f"unusable user name or password for the test server: {name!r}")
        home = self.root / "home" / name
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, MAIL_UID, MAIL_GID)
        line = f"{name}:{{PLAIN}}{password}:{MAIL_UID}:{MAIL_GID}::{home}\n"
        # Write a new file and rename it in, so Dovecot never reads half a line.
        tmp = self.users_path / f".{name}.tmp"
        tmp.write_text(line)
        tmp.chmod(0o644)
        tmp.replace(self.users_path / name)

    def new_account(self, prefix: str = "user") -> ImapAccount:
        """A fresh user with a random password, so that no two tests share a mailbox."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        password = uuid.uuid4().hex
        self.add_user(name, password)
        return ImapAccount(self.host, self.port, name, password)

    def append(self, user: str, password: str, raw: bytes, folder: str = "INBOX") -> None:
        """Deliver one message by IMAP APPEND (for many, use :meth:`append_many`)."""
        self.append_many(user, password, [raw], folder)

    def append_many(
        self,
        user: str,
        password: str,
        raws: Iterable[bytes],
        folder: str = "INBOX",
        *,
        window: int = 64,
    ) -> int:
        """Deliver messages in order over one IMAP connection; return how many.

        Pipelined APPENDs with non-synchronising literals (LITERAL+, RFC 7888): up to
        ``window`` commands are in flight, so delivery does not wait a round trip per
        message as imaplib's APPEND does. UIDs are assigned in the order given (unlike files
        dropped into ``Maildir/new`` behind Dovecot's back).
        """
        mailbox = _quote(folder)
        count = 0
        with _Wire(self.host, self.port) as wire:
            wire.command(b"L LOGIN " + _quote(user) + b" " + _quote(password))
            pending: list[bytes] = []
            for raw in raws:
                tag = b"A%d" % count
                wire.send(b"%s APPEND %s {%d+}\r\n%s\r\n" % (tag, mailbox, len(raw), raw))
                pending.append(tag)
                count += 1
                if len(pending) >= window:
                    wire.expect_ok(pending)
                    pending = []
            wire.expect_ok(pending)
            wire.send(b"Z LOGOUT\r\n")
        return count

    def kill_connections(self, user: str | None = None) -> None:
        """Drop every IMAP session of ``user`` (all users if None), for fault tests.

        Uses ``doveadm kick``, which asks the running server's anvil through ``base_dir``.
        """
        doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
        mask = user if user is not None else "*"
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [doveadm, "-c", str(self.config_path), "kick", mask],
            capture_output=True,
            check=False,
            timeout=10,
        )
        # exit code 68 ("no users found") is not an error for a fault injector
        if result.returncode not in (0, 68):
            raise DovecotError(
                f"doveadm kick failed ({result.returncode}): {result.stderr.decode().strip()}"
            )

    # -- TLS ----------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's self-signed certificate."""
        if not self.tls:
            raise DovecotError("this server was started without tls=True")
        return ssl.create_default_context(cafile=str(self.cert_path))

    def _make_certificate(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise DovecotError("openssl is needed to make the test certificate")
        files = ("-keyout", str(self.key_path), "-out", str(self.cert_path))
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [openssl, *_OPENSSL_ARGS, *files], check=True, capture_output=True, timeout=30
        )

    # -- internals ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        if self.tls:
            ssl_block = (
                f"ssl = yes\nssl_cert = <{self.cert_path}\nssl_key = <{self.key_path}\n"
                "ssl_min_protocol = TLSv1.2"
            )
        else:
            ssl_block = "ssl = no"
        oauth2 = bool(self.oauth2_introspection_url)
        if oauth2:
            (self.root / "dovecot-oauth2.conf.ext").write_text(
                _OAUTH2_CONF.format(url=self.oauth2_introspection_url)
            )
        self.config_path.write_text(
            _CONFIG.format(
                root=self.root,
                host=self.host,
                port=self.port,
                ssl_port=self.ssl_port,
                uid=MAIL_UID,
                ssl=ssl_block,
                oauth2_mechanisms=" xoauth2 oauthbearer" if oauth2 else "",
                oauth2_passdb=_OAUTH2_PASSDB.format(root=self.root) if oauth2 else "",
                passwd_mechanisms="\n  mechanisms = plain login" if oauth2 else "",
            )
        )

    def _wait_for_greeting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise DovecotError(f"dovecot exited at start:\n{self._stderr()}{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1) as sock,
            ):
                if sock.recv(1024).startswith(b"* OK"):
                    return
            time.sleep(0.02)
        raise DovecotError(f"dovecot did not greet within {timeout}s:\n{self.log_tail()}")

    def _stderr(self) -> str:
        if self._process is None or self._process.stderr is None:
            return ""
        return self._process.stderr.read().decode(errors="replace")

    def _reap(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
