"""SMTP replies the front sends: reply code, RFC 3463 enhanced status code and text.

One table, so every refusal the relay makes carries the same code for the same reason, and a
test can name the reply instead of repeating strings. RFC 2034 (ENHANCEDSTATUSCODES) asks for
an enhanced code on every 2xx, 4xx and 5xx reply except the greeting and the EHLO/HELO reply;
`with_enhanced_code` adds a generic one to replies that lack it (a safety net for texts that
come from the library).

Pure values: no I/O. Used by relay.front; the reply strings are also what tests compare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply line: ``550 5.7.1 Relay access denied``."""

    code: int
    status: str  # enhanced status code (RFC 3463), e.g. "5.7.1"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)


# ----------------------------------------------------------------------------- success
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
SENDER_RATE_LIMITED = Reply(450, "4.7.0", "Too many messages from this sender; try again later")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = "354 End data with <CR><LF>.<CR><LF>"  # 3xx: no enhanced code (RFC 2034)
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
BYE = Reply(221, "2.0.0", "Bye")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

# ----------------------------------------------------------------------------- session
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Idle timeout exceeded, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
CLIENT_BLOCKED = Reply(421, "4.7.0", "Too many authentication failures from your address, try again later")
TOO_MANY_CONNECTIONS_RATE = Reply(421, "4.7.0", "Too many connections from your address, slow down")
TOO_MUCH_MAIL = Reply(421, "4.7.0", "Too much mail from your address, try again later")
PREGREET = Reply(554, "5.5.1", "Protocol error: you talked before the greeting")

# ----------------------------------------------------------------------------- syntax and sequence
BAD_SYNTAX = Reply(500, "5.5.2", "Syntax error")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_NEWLINE = Reply(501, "5.5.2", "Bare CR or LF in command line not allowed")
CONTROL_CHARACTERS = Reply(501, "5.5.2", "Control characters in command line not allowed")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Invalid command arguments")
BAD_SENDER = Reply(553, "5.1.7", "Invalid sender address")
BAD_RECIPIENT = Reply(553, "5.1.3", "Invalid recipient address")
NULL_RECIPIENT = Reply(501, "5.1.3", "The null address is not a valid recipient")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Parameter not recognized")
BAD_PARAMETER = Reply(501, "5.5.4", "Invalid parameter value")
NO_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")

# ----------------------------------------------------------------------------- policy
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ROUTING_CHARACTERS = Reply(550, "5.7.1", "Routing characters in the local part are not accepted")
NO_ROUTE = Reply(550, "5.4.4", "No route to the recipient's destination")
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
VERIFY_UNAVAILABLE = Reply(450, "4.1.1", "Recipient address verification unavailable, try again later")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
TLS_REQUIRED_FOR_AUTH = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "AUTH not available")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")

# ----------------------------------------------------------------------------- limits and message
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message line longer than 998 octets (RFC 5322 2.1.1)")
DATA_NUL = Reply(554, "5.6.0", "Message contains NUL characters")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop detected")

# ----------------------------------------------------------------------------- local trouble
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")

_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CODE = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)


def with_enhanced_code(line: str) -> str:
    """Add a generic enhanced code (``2.0.0``, ``4.0.0``, ``5.0.0``) to a reply that lacks one."""
    if _HAS_ENHANCED.match(line):
        return line
    match = _CODE.match(line)
    if not match:
        return line
    klass, rest, sep, text = match.groups()
    return f"{klass}{rest}{sep}{klass}.0.0 {text}".rstrip()


def reject_reply(code: int, message: str) -> str:
    """A RejectHop's configured reply, with an enhanced code added if its message has none."""
    return with_enhanced_code(f"{code} {message}")
