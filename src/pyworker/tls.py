"""TLS: the SSLContext a worker serves with, built from the settings.

Each worker builds its own context (an SSLContext cannot travel as JSON, and
a fresh process reads the files as they are now, so a reload picks up a
renewed certificate).  The primary builds one too, before it starts any
worker, only to check the files: a missing certificate, a wrong password or
a key that does not match is one line at startup, not a worker that dies
again and again.
"""

from __future__ import annotations

import ssl

from cydispatch.settings import Settings

# Keyed by settings.CERT_REQS, the names --ssl-cert-reqs takes (as uvicorn's).
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
             "required": ssl.CERT_REQUIRED}
# HTTP/1.1 is all a worker speaks; a client offering h2 must not be told otherwise.
ALPN_PROTOCOLS = ["http/1.1"]
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class TlsError(ValueError):
    """A TLS setting that cannot be served with; the message is one line for the user."""


class PasswordNeeded(Exception):
    """The key is encrypted and no --ssl-keyfile-password was given."""


class KeyPassword:
    """The password callback for load_cert_chain.

    Always a callable, so that OpenSSL never prompts on a terminal for an
    encrypted key (it would, in a worker, given None); and it tells whether
    the key was encrypted at all, which OpenSSL's errors do not.
    """

    def __init__(self, password: str) -> None:
        self.password = password
        self.asked = False

    def __call__(self) -> str:
        self.asked = True
        if not self.password:
            raise PasswordNeeded()
        return self.password


def enabled(settings: Settings) -> bool:
    return bool(settings.ssl_certfile)


def check_combination(settings: Settings) -> None:
    """TLS options that mean nothing without the others."""
    if not settings.ssl_certfile:
        for name in ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs", "ssl_ciphers"):
            if getattr(settings, name):
                raise TlsError(f"--{name.replace('_', '-')} needs --ssl-certfile")
        if settings.ssl_cert_reqs != "none":
            raise TlsError("--ssl-cert-reqs needs --ssl-certfile")
        return
    if settings.proxy_protocol and settings.mode != "dispatch":
        # The PROXY header comes before the TLS hello on the wire: the worker
        # reads it off a handed socket before its handshake starts, but in the
        # baseline modes uvloop accepts and begins TLS itself.
        raise TlsError(f"--proxy-protocol with TLS is served in --mode dispatch, "
                       f"not {settings.mode}")
    if settings.ssl_cert_reqs != "none" and not settings.ssl_ca_certs:
        raise TlsError(f"--ssl-cert-reqs {settings.ssl_cert_reqs} needs --ssl-ca-certs: "
                       "the CAs that client certificates are checked against")


def check(settings: Settings) -> None:
    """For the primary, before any worker starts: TlsError unless TLS can be served as set."""
    if enabled(settings):
        server_context(settings)    # checks the combination first
    else:
        check_combination(settings)


def read_or_fail(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TlsError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def certificate_problem(certfile: str) -> str | None:
    """Why OpenSSL cannot read the certificates in `certfile`; None if it can.

    load_cert_chain's error does not say which of certificate and key it
    choked on: a certificate cut short was reported as a missing key.
    """
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    return None


def server_context(settings: Settings) -> ssl.SSLContext:
    """The context to serve TLS with; TlsError says in one line what is wrong."""
    check_combination(settings)
    certfile, keyfile = settings.ssl_certfile, settings.ssl_keyfile
    # Read first: OpenSSL's own errors name neither the file nor the reason.
    if PEM_CERTIFICATE not in read_or_fail("--ssl-certfile", certfile):
        raise TlsError(f"--ssl-certfile: {certfile} holds no PEM certificate")
    if keyfile:
        read_or_fail("--ssl-keyfile", keyfile)
    key_source = keyfile or certfile
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    password = KeyPassword(settings.ssl_keyfile_password)
    try:
        context.load_cert_chain(certfile, keyfile or None, password=password)
    except PasswordNeeded:
        raise TlsError(f"--ssl-keyfile: the key in {key_source} is encrypted: give "
                       "--ssl-keyfile-password (or CYDISPATCH_SSL_KEYFILE_PASSWORD)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"--ssl-keyfile: the key in {key_source} does not match "
                           f"the certificate in {certfile}") from None
        problem = certificate_problem(certfile)
        if problem is not None:
            raise TlsError(f"--ssl-certfile: cannot load the certificate in {certfile} "
                           f"({problem})") from None
        if password.asked:
            raise TlsError(f"--ssl-keyfile-password does not decrypt the key in "
                           f"{key_source}") from None
        if not keyfile:
            raise TlsError(f"--ssl-certfile: no private key in {certfile}: "
                           "give --ssl-keyfile") from None
        raise TlsError(f"--ssl-keyfile: no private key in {keyfile}"
                       + (f" ({exc.reason})" if exc.reason else "")) from None
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.verify_mode = CERT_REQS[settings.ssl_cert_reqs]
    if settings.ssl_ca_certs:
        read_or_fail("--ssl-ca-certs", settings.ssl_ca_certs)
        try:
            context.load_verify_locations(settings.ssl_ca_certs)
        except ssl.SSLError as exc:
            raise TlsError(f"--ssl-ca-certs: no CA certificate in {settings.ssl_ca_certs} "
                           f"({exc.reason or exc})") from None
    if settings.ssl_ciphers:
        try:
            context.set_ciphers(settings.ssl_ciphers)
        except ssl.SSLError:
            raise TlsError(f"--ssl-ciphers: {settings.ssl_ciphers!r} selects no cipher "
                           "(see `openssl ciphers`)") from None
    return context
