"""A real Dovecot (Debian's dovecot-pop3d and dovecot-imapd) for the bounce reader's tests.

One server per test session, in the foreground (``dovecot -F``) from a configuration written
to a temporary folder: POP3, POP3S, IMAP and IMAPS on 127.0.0.1 at free ports, TLS with the
trustme test CA, one user in a passwd-file. Each test gets that user's Maildir emptied (the
``dovecot`` fixture), so tests never see each other's messages. Mail is delivered by writing
files into ``Maildir/new``, as a local delivery agent does.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.support.waiting import wait_for_sync

SCHEMES = ("pop3", "pop3s", "imap", "imaps")
_SUBS = ("tmp", "new", "cur")

_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
default_internal_user = dovecot
default_login_user = dovenull
protocols = pop3 imap
listen = 127.0.0.1
first_valid_uid = 0
ssl = yes
ssl_cert = <{root}/server.pem
ssl_key = <{root}/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
"""


_LISTENERS = """\
service {protocol}-login {{
  inet_listener {protocol} {{
    port = {plain}
  }}
  inet_listener {protocol}s {{
    port = {tls}
    ssl = yes
  }}
}}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class DovecotServer:
    root: Path
    ports: dict[str, int]
    uid: int
    gid: int
    user: str
    password: str

    @property
    def home(self) -> Path:
        return self.root / "home" / self.user

    def url(self, scheme: str, *, password: str | None = None, port: int | None = None) -> str:
        secret = self.password if password is None else password
        return f"{scheme}://{self.user}:{secret}@127.0.0.1:{port or self.ports[scheme]}"

    def deliver(self, raw: bytes) -> str:
        """Put a message into the Maildir as a delivery agent does (write in tmp/, then
        rename into new/); returns its file name."""
        maildir = self.home / "Maildir"
        for folder in (self.home, maildir, *(maildir / sub for sub in _SUBS)):
            if not folder.exists():
                folder.mkdir()
                os.chown(folder, self.uid, self.gid)
        name = f"{secrets.token_hex(8)}.test"
        (maildir / "tmp" / name).write_bytes(raw)
        (maildir / "tmp" / name).rename(maildir / "new" / name)
        return name

    def messages(self) -> list[bytes]:
        """What the Maildir holds now (new and cur, not yet expunged)."""
        maildir = self.home / "Maildir"
        files = [path for sub in _SUBS[1:] for path in sorted((maildir / sub).glob("*"))]
        return [path.read_bytes() for path in files]


def _mail_user() -> tuple[int, int]:
    """Dovecot will not run mail processes as root: as root, use its own system user."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    account = pwd.getpwnam("dovecot")
    return account.pw_uid, account.pw_gid


@contextmanager
def running_dovecot(tls_ca: trustme.CA) -> Iterator[DovecotServer]:
    """A Dovecot of its own until the block ends."""
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not Path(binary).exists():
        pytest.fail("dovecot is not installed: apt-get install -y dovecot-pop3d dovecot-imapd")
    # Not under pytest's temporary folder: that one only its owner may enter, and Dovecot's
    # auth and mail processes run as other users.
    root = Path(tempfile.mkdtemp(prefix="notifier-dovecot-"))
    root.chmod(0o755)
    uid, gid = _mail_user()
    (root / "home").mkdir()
    os.chown(root / "home", uid, gid)
    user, password = "bounces", f"pw-{secrets.token_hex(8)}"
    (root / "passwd").write_text(f"{user}:{password}\n")
    certificate = tls_ca.issue_cert("127.0.0.1", "localhost")
    certificate.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    certificate.private_key_pem.write_to_path(str(root / "server.key"))
    ports = {scheme: _free_port() for scheme in SCHEMES}
    config = root / "dovecot.conf"
    config.write_text(
        _CONFIG.format(root=root, uid=uid, gid=gid)
        + "".join(
            _LISTENERS.format(protocol=name, plain=ports[name], tls=ports[name + "s"])
            for name in ("pop3", "imap")
        )
    )
    with (root / "stderr").open("wb") as stderr:
        process = subprocess.Popen([binary, "-F", "-c", str(config)], stderr=stderr)
    try:
        wait_for_sync(
            lambda: process.poll() is not None or all(map(_answers, ports.values())),
            timeout=30,
            what="dovecot to listen",
        )
        if process.poll() is not None:
            logs = [root / "stderr", root / "dovecot.log"]
            pytest.fail("dovecot exited: " + "".join(p.read_text() for p in logs if p.exists()))
        yield DovecotServer(root, ports, uid, gid, user, password)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_server(tls_ca: trustme.CA) -> Iterator[DovecotServer]:
    with running_dovecot(tls_ca) as server:
        yield server


@pytest.fixture
def dovecot_alone(tls_ca: trustme.CA) -> Iterator[DovecotServer]:
    """A server for this test only, for tests that fail logins: Dovecot makes every later
    login from that address wait longer and longer (up to 15 s), whoever makes it."""
    with running_dovecot(tls_ca) as server:
        yield server


@pytest.fixture
def dovecot(dovecot_server: DovecotServer) -> DovecotServer:
    """The server, its user's mailbox empty (no session is open between tests)."""
    shutil.rmtree(dovecot_server.home, ignore_errors=True)
    return dovecot_server
