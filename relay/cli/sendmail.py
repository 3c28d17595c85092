"""`mailrelay sendmail`: the sendmail-compatible command for programs that hand mail to
``sendmail`` (cron, PHP's mail(), legacy tools), submitting to a relay over SMTP.

    mailrelay sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [--server HOST[:PORT]] [RECIPIENT...]

The same program answers to the name ``sendmail`` (a symlink to ``mailrelay``, as the image
ships at /usr/sbin/sendmail, or the ``mailrelay-sendmail`` console script): relay.cli's group
hands such a call here. The command line, the message, the envelope and the exit status are
relay.core.sendmail's decisions; this module reads stdin and the environment
(``MAILRELAY_SERVER``, default ``127.0.0.1:25``; ``USER``), submits with relay.submit (plain
SMTP, as a local sendmail's peer on a trusted network) and prints failures to stderr as
``sendmail: ...``. Holds no logic beyond that.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import BinaryIO, TextIO

import click

from relay.core import sendmail as rules
from relay.submit import ServerOptions, SubmitError, submit

USAGE = """usage: sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [--server HOST[:PORT]] [RECIPIENT...]

Reads a message on stdin and submits it to the relay at --server, else $MAILRELAY_SERVER,
else 127.0.0.1:25. -t adds the To, Cc and Bcc recipients (Bcc is removed from the message);
-i/-oi: a line with a single dot does not end the message. Exit status: 0 accepted, 64 usage,
65 bad message, 67 recipient refused, 69 relay unreachable, 75 temporary failure (retry)."""


def run(
    argv: Sequence[str],
    *,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """One sendmail call; returns its exit status."""
    err = stderr or sys.stderr
    env = dict(os.environ if environ is None else environ)
    if any(word in ("-h", "--help") for word in argv):
        print(USAGE, file=err)
        return rules.EX_OK
    try:
        args = rules.parse_args(argv)
        host, port = rules.parse_server(args.server or env.get("MAILRELAY_SERVER") or rules.DEFAULT_SERVER)
    except rules.UsageError as exc:
        print(f"sendmail: {exc}\n{USAGE}", file=err)
        return rules.EX_USAGE
    data = (stdin or sys.stdin.buffer).read()
    try:
        user = env.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "nobody"
    try:
        submission = rules.prepare(
            data,
            args,
            user=user,
            hostname=socket.getfqdn(),
            now=datetime.now().astimezone(),
            token=f"{secrets.token_hex(8)}.sendmail",
        )
    except rules.UsageError as exc:
        print(f"sendmail: {exc}", file=err)
        return rules.EX_USAGE
    except rules.MessageError as exc:
        print(f"sendmail: {exc}", file=err)
        return rules.EX_DATAERR
    options = ServerOptions(host=host, port=port, tls="none", local_hostname=socket.getfqdn())
    try:
        result = asyncio.run(submit(submission, options))
    except SubmitError as exc:
        print(f"sendmail: {exc}", file=err)
        return rules.status_for_failure(exc.kind, exc.code)
    for recipient in result.recipients:
        if args.verbose or not recipient.accepted:
            state = "accepted" if recipient.accepted else "refused"
            print(f"sendmail: <{recipient.address}> {state}: {recipient.code} {recipient.text}", file=err)
    return rules.status_for_recipients([(r.accepted, r.code, r.stage) for r in result.recipients])


def main() -> None:
    """The ``mailrelay-sendmail`` console script (and ``sendmail`` as a symlink name)."""
    raise SystemExit(run(sys.argv[1:]))


@click.command(
    "sendmail",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def sendmail_command(argv: tuple[str, ...]) -> None:
    """sendmail-compatible submission: [-t] [-i|-oi] [-f SENDER] [-F NAME] [RECIPIENT...]
    (reads the message on stdin; --help for the exit statuses)."""
    raise SystemExit(run(argv))
