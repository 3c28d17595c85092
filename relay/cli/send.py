"""`mailrelay send`: the user agent's command line.

Parses options, reads the files they name, asks `relay.core.compose` for the message and envelope
(or loads an .eml as is) and `relay.submit` to hand it to a relay; prints one line per recipient
and exits 0 when every recipient was accepted, 1 when any was refused or the submission failed,
2 for usage errors (with a message that says what to do). The password comes from an
environment variable or an interactive prompt, never from an option value (it would end up in
the shell history and the process list). Holds no logic beyond that.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click

from relay.core.compose import Attachment, ComposeError, Submission, compose, load_eml, parse_header_option
from relay.submit import Progress, ServerOptions, SubmitError, TlsChoice, submit

PROGRESS_THRESHOLD = 1024 * 1024  # show progress for messages of at least 1 MiB
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _parse_server(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise click.BadParameter(f"{value!r}: use host:port, e.g. 127.0.0.1:587", param_hint="--server")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r}: use host:port, e.g. 127.0.0.1:587", param_hint="--server")
    return host, int(port)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=what) from exc


def _text(data: bytes, path: object, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint=what) from exc


def _body(body: str | None, body_file: Path | None, eml: Path | None) -> str:
    if body is not None and body_file is not None:
        raise click.UsageError("give the body once: BODY, --body TEXT or --body-file FILE (or stdin)")
    if body is not None:
        return body
    if body_file is not None:
        if str(body_file) == "-":
            return _text(sys.stdin.buffer.read(), "stdin", "--body-file")
        return _text(_read(body_file, "--body-file"), body_file, "--body-file")
    if eml is None and not sys.stdin.isatty():
        return _text(sys.stdin.buffer.read(), "stdin", "stdin")
    return ""


def _password(user: str | None, password_env: str) -> str | None:
    if user is None:
        return None
    password = os.environ.get(password_env)
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"--user {user} needs a password: set the environment variable {password_env} "
            "(or run interactively to be prompted)"
        )
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))


def _dry_run(submission: Submission) -> None:
    sys.stdout.flush()
    out = sys.stdout.buffer
    lines = [f"MAIL FROM:<{submission.mail_from}>"]
    lines += [f"RCPT TO:<{address}>" for address in submission.recipients]
    if submission.smtputf8:
        lines.append("# needs SMTPUTF8")
    out.write(
        ("\n".join(["# envelope", *lines, f"# message ({len(submission.content)} bytes)"]) + "\n").encode()
    )
    out.write(submission.content)
    out.flush()


def _progress_printer() -> Progress:
    last = -1

    def report(sent: int, size: int) -> None:
        nonlocal last
        percent = 100 * sent // size if size else 100
        if percent != last:
            last = percent
            click.echo(f"sending {size / 1048576:.1f} MiB: {percent}%", err=True)

    return report


@click.command("send")
@click.option("--from", "sender", metavar="ADDRESS", help="Sender (From header and envelope sender).")
@click.option("--to", multiple=True, metavar="ADDRESS", help="Recipient in To (repeatable).")
@click.option("--cc", multiple=True, metavar="ADDRESS", help="Recipient in Cc (repeatable).")
@click.option("--bcc", multiple=True, metavar="ADDRESS", help="Hidden recipient: envelope only (repeatable).")
@click.option("--subject", default="", help="Subject line.")
@click.option("--body", metavar="TEXT", help="Text body (else --body-file, else stdin).")
@click.option(
    "--body-file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True), help="Text body file."
)
@click.option("--html-file", type=_EXISTING_FILE, help="HTML alternative to the text body.")
@click.option("--attach", multiple=True, type=_EXISTING_FILE, help="Attach a file of any type (repeatable).")
@click.option(
    "--header", "headers", multiple=True, metavar="'NAME: VALUE'", help="Extra header (repeatable)."
)
@click.option(
    "--eml",
    type=_EXISTING_FILE,
    help="Send this existing message as is; the envelope comes from its headers unless --from/--to given.",
)
@click.option(
    "--server",
    default="localhost:587",
    show_default=True,
    envvar="MAILRELAY_SERVER",
    help="Relay to submit to, host:port (env MAILRELAY_SERVER).",
)
@click.option(
    "--tls",
    type=click.Choice(["starttls", "implicit", "none"]),
    default=None,
    help="starttls (default), implicit (default on port 465) or none.",
)
@click.option("--ca-file", type=_EXISTING_FILE, help="CA bundle (PEM).")
@click.option("--insecure", is_flag=True, help="Do not verify the server certificate.")
@click.option("--user", help="Authenticate as this user (password from --password-env or a prompt).")
@click.option(
    "--password-env",
    default="MAILRELAY_PASSWORD",
    show_default=True,
    metavar="NAME",
    help="Environment variable holding the password.",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for each reply.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Report progress while sending (default: for messages of 1 MiB or more on a terminal).",
)
@click.option("--dry-run", is_flag=True, help="Print the envelope and message instead of sending.")
@click.argument("body_argument", metavar="[BODY]", required=False)
def send_command(
    server: str,
    tls: TlsChoice | None,
    ca_file: Path | None,
    insecure: bool,
    user: str | None,
    password_env: str,
    timeout: float,
    progress: bool | None,
    dry_run: bool,
    body_argument: str | None,
    **message: Any,
) -> None:
    """Compose a message (or take an .eml) and submit it to a relay over SMTP.

    The text body is BODY (one argument: quote it), or --body TEXT, or --body-file FILE
    (- for stdin), or standard input when it is not a terminal.

    \b
    Examples:
      mailrelay send --server 127.0.0.1:2525 --tls none --from me@example.com \\
          --to you@example.net --subject hi "hello" --attach photo.png
      MAILRELAY_PASSWORD=... mailrelay send --server mail.example.com:587 --user me \\
          --from me@example.com --to you@example.net --eml message.eml

    Prints one line per recipient. Exit status: 0 all accepted, 1 a recipient refused or the
    submission failed, 2 usage error.
    """
    host, port = _parse_server(server)
    chosen_tls: TlsChoice = tls or ("implicit" if port == 465 else "starttls")
    if body_argument is not None and message["body"] is not None:
        raise click.UsageError("give the body once: BODY or --body TEXT, not both")
    if body_argument is not None:
        message["body"] = body_argument
    submission = _submission(**message)  # the message options, as _submission names them
    if dry_run:
        _dry_run(submission)
        return

    options = ServerOptions(
        host=host,
        port=port,
        tls=chosen_tls,
        ca_file=ca_file,
        insecure=insecure,
        user=user,
        password=_password(user, password_env),
        timeout=timeout,
    )
    show_progress = progress if progress is not None else sys.stderr.isatty()
    reporter = None
    if show_progress and (progress or len(submission.content) >= PROGRESS_THRESHOLD):
        reporter = _progress_printer()
    try:
        result = asyncio.run(submit(submission, options, progress=reporter))
    except SubmitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    width = max(len(r.address) for r in result.recipients)
    for recipient in result.recipients:
        state = "accepted" if recipient.accepted else "refused "
        click.echo(f"{state} {recipient.address:<{width}}  {recipient.code} {recipient.text}")
    sys.exit(0 if result.all_accepted else 1)


def _submission(
    *,
    sender: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    subject: str,
    body: str | None,
    body_file: Path | None,
    html_file: Path | None,
    attach: tuple[Path, ...],
    headers: tuple[str, ...],
    eml: Path | None,
) -> Submission:
    """The envelope and message the options describe (an .eml as is, or a composed one)."""
    try:
        if eml is not None:
            conflicting = [
                name
                for name, given in (
                    ("--subject", subject),
                    ("--body/BODY", body is not None),
                    ("--body-file", body_file),
                    ("--html-file", html_file),
                    ("--attach", attach),
                    ("--header", headers),
                )
                if given
            ]
            if conflicting:
                raise click.UsageError(f"--eml sends the file as is; drop {', '.join(conflicting)}")
            return load_eml(_read(eml, "--eml"), mail_from=sender, recipients=(*to, *cc, *bcc))
        if not sender:
            raise click.UsageError("a sender is needed: --from you@example.com")
        text = _body(body, body_file, eml)
        html = _text(_read(html_file, "--html-file"), html_file, "--html-file") if html_file else None
        attachments = [Attachment(path.name, _read(path, "--attach")) for path in attach]
        return compose(
            mail_from=sender,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=subject,
            text=text,
            html=html,
            attachments=attachments,
            headers=[parse_header_option(h) for h in headers],
        )
    except ComposeError as exc:
        raise click.UsageError(str(exc)) from exc
