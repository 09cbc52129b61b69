#!/usr/bin/python3
"""A test SMTP server that requires STARTTLS, for coordinator/tests/notify.rs
and tests/tests/alerts.rs.

Runs Debian's aiosmtpd (python3-aiosmtpd; use /usr/bin/python3, which has
it). Every message received is saved in --out-dir as NNNN.json: the
envelope, whether the session was TLS and authenticated, and the decoded
subject and body, so the Rust test needs no MIME parser. Prints "ready"
once it listens; stops on SIGTERM.
"""

import argparse
import email
import email.policy
import json
import os
import signal
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class SaveToDir:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None,
            "authenticated": bool(session.authenticated),
            "subject": str(msg["subject"]),
            "from": str(msg["from"]),
            "to": str(msg["to"]),
            "body": body.get_content() if body is not None else "",
            "raw": envelope.content.decode("utf-8", "replace"),
        }
        with self.lock:
            self.count += 1
            name = os.path.join(self.out_dir, "%04d.json" % self.count)
        # Written whole, then renamed: the reader never sees half a file.
        with open(name + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(name + ".tmp", name)
        return "250 Message accepted for delivery"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    args = p.parse_args()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)

    kwargs = {}
    if args.user:
        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                auth_data is not None
                and getattr(auth_data, "login", None) == args.user.encode()
                and getattr(auth_data, "password", None) == args.password.encode()
            )
            return AuthResult(success=ok)

        kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=True)

    controller = Controller(
        SaveToDir(args.out_dir),
        hostname=args.host,
        port=args.port,
        tls_context=ctx,
        require_starttls=True,
        **kwargs,
    )
    controller.start()
    print("ready", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
