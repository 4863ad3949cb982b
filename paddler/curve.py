"""CurveZMQ on the broker's sockets: keypairs, allow-lists, and the socket options.

Keys are files in the format ``zmq.auth.create_certificates`` writes: ``NAME.key``
holds the public key, ``NAME.key_secret`` both keys (mode 0600). The broker has a
keypair; each of its sockets admits the public keys found in one folder (agents,
clients), read again whenever the folder changes, so keys added to it take effect
without a restart. Authentication runs in pyzmq's ZAP authenticator thread; an
agent is its key (the broker reads the key a connection authenticated with and
shows its fingerprint), a name it claims is a label.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from paddler.errors import ConfigurationError

log = logging.getLogger("paddler.curve")

AGENTS_DOMAIN = "agents"
CLIENTS_DOMAIN = "clients"
KEY_HELP = "generate keys with: paddler keys generate --out DIR NAME"


@dataclass(frozen=True)
class Keypair:
    public: bytes
    """Z85, 40 characters."""
    secret: bytes


def generate(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) into ``out_dir``."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigurationError("NAME", "must be a plain file name")
    out_dir.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(out_dir, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(path: str | Path, what: str) -> Keypair:
    """The keypair in a ``.key_secret`` file; ``ConfigurationError`` naming ``what``."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(what, f"cannot read a secret key from {path}: {exc}") from exc
    if not secret:
        raise ConfigurationError(what, f"{path} holds no secret key ({KEY_HELP})")
    return Keypair(public, secret)


def load_public(path: str | Path, what: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(what, f"cannot read a public key from {path}: {exc}") from exc
    return public


def fingerprint(public: bytes | str) -> str:
    """A short, stable name of a public key: the first 16 hex digits of its SHA-256."""
    key = public.encode() if isinstance(public, str) else public
    return hashlib.sha256(key).hexdigest()[:16]


class KeyFolder:
    """The public keys of one allow-list folder (plus any given in memory), read
    again when the folder or one of its ``.key`` files changes: called by the
    authenticator thread for every handshake, which is rare, so listing the folder
    each time is cheap."""

    def __init__(self, folder: Path | None, extra: Iterable[bytes] = ()) -> None:
        self.folder = folder
        self.extra = set(extra)
        self._keys: set[bytes] = set()
        self._stamp: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> None:
        if self.folder is None:
            return
        try:
            stat = self.folder.stat()
        except OSError:
            self._keys = set()
            return
        try:
            files = sorted(p for p in self.folder.iterdir() if p.suffix == ".key" and p.is_file())
            # a key file rewritten in place changes no folder time: its own counts too
            stamp: tuple[Any, ...] = (
                stat.st_mtime_ns,
                stat.st_ino,
                tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files),
            )
        except OSError:
            self._keys = set()
            return
        if stamp == self._stamp:
            return
        keys = set()
        for path in files:
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s: %s", path, exc)
                continue
            keys.add(public)
        self._keys, self._stamp = keys, stamp
        log.info("%d public keys allowed from %s", len(keys), self.folder)

    def allows(self, key: bytes) -> bool:
        with self._lock:
            self._reload()
            return key in self._keys or key in self.extra

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook (``key`` is Z85)."""
        allowed = self.allows(key)
        if not allowed:
            log.warning("refused a %s connection with key %s", domain, fingerprint(key))
        return allowed


class CurveServer:
    """The broker side: a ZAP authenticator thread and the server options of its
    ROUTER sockets, one domain (and one allow-list) per socket."""

    def __init__(
        self,
        context: zmq.Context[Any],
        keypair: Keypair,
        agent_keys: KeyFolder,
        client_keys: KeyFolder,
    ) -> None:
        self.keypair = keypair
        self.authenticator = ThreadAuthenticator(context, log=log)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(AGENTS_DOMAIN, agent_keys)
        self.authenticator.configure_curve_callback(CLIENTS_DOMAIN, client_keys)

    def secure(self, socket: zmq.Socket[Any], domain: str) -> None:
        socket.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()


def secure_client(socket: zmq.Socket[Any], keypair: Keypair, server_public: bytes) -> None:
    """CurveZMQ client options of a DEALER (agent, client library, HTTP worker)."""
    socket.curve_secretkey = keypair.secret
    socket.curve_publickey = keypair.public
    socket.curve_serverkey = server_public


def client_keys(
    broker_public_key: str | Path | None, curve_secret_key: str | Path | None, what: str
) -> tuple[Keypair, bytes] | None:
    """``(our keypair, the broker's public key)`` from two files, both or neither."""
    if broker_public_key is None and curve_secret_key is None:
        return None
    if broker_public_key is None or curve_secret_key is None:
        raise ConfigurationError(
            what, "give both --broker-public-key and --curve-secret-key, or neither"
        )
    keypair = load_keypair(curve_secret_key, "--curve-secret-key")
    return keypair, load_public(broker_public_key, "--broker-public-key")


def is_loopback_address(address: str) -> bool:
    """Whether a ZeroMQ ``tcp://host:port`` (or ``ipc://``, ``inproc://``) address
    stays on this machine."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface: may face a network


def write_public(path: Path, public: bytes) -> Path:
    """A public key file in the format of ``zmq.auth.create_certificates``."""
    path.write_text(
        "#   ZeroMQ CURVE Public Certificate\n"
        "#   Exchange securely, or use a secure mechanism to verify the contents\n"
        "#   of this file after exchange. Store public certificates in your home\n"
        "#   directory, in the .curve subdirectory.\n"
        "\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public.decode()}"\n'
    )
    return path


class WorkerKeys:
    """What a balancer with curve makes for its own HTTP workers at start: a keypair
    in a private folder (allowed on the client socket in memory, never on disk in
    an allow-list) and the broker's public key beside it."""

    def __init__(self, broker_public: bytes) -> None:
        self.folder = PrivateKeys("paddler-http-keys-")
        secret = self.folder.make("http-workers")
        self.public = load_public(secret, "http workers")
        broker_key = write_public(self.folder.path / "broker.key", broker_public)
        self.files = [str(broker_key), str(secret)]
        """``[broker public key file, workers' secret key file]`` for the workers."""

    def close(self) -> None:
        self.folder.close()


class PrivateKeys:
    """A private folder (mode 0700) of keypairs made for one run: the balancer's
    own HTTP workers, ``paddler cluster``'s broker and agents."""

    def __init__(self, prefix: str = "paddler-keys-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(self.path, 0o700)

    def make(self, name: str, public_dir: Path | None = None) -> Path:
        """A new keypair ``name``; its public key is also copied into ``public_dir``
        (an allow-list folder). Returns the secret key file."""
        public, secret = generate(self.path, name)
        if public_dir is not None:
            public_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(public, public_dir / public.name)
        return secret

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
