"""E-mail: send over SMTP (smtplib, in a thread so the session's loop never blocks), read the
latest messages of a local Maildir (settings["maildir"], default <data_dir>/Maildir).

Settings: smtp_host, smtp_port (default 587 with STARTTLS, else 25), smtp_from,
smtp_starttls ("true"/"false", default false) with smtp_ca_file (a CA to trust besides the
system's, for a self-hosted server), smtp_username and smtp_password (or the environment's
SMTP_PASSWORD) to log in. The password is never part of a result or an error.
"""
from __future__ import annotations

import asyncio
import mailbox
import os
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.when import as_json, local_text, required

TIMEOUT_S = 20
SNIPPET_CHARS = 200


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    starttls: bool = False
    username: str = ""
    password: str = ""
    ca_file: str = ""

    def __repr__(self) -> str:  # no password in tracebacks or logs
        return f"SmtpSettings(host={self.host!r}, port={self.port}, sender={self.sender!r}, starttls={self.starttls})"

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> SmtpSettings:
        host, sender = settings.get("smtp_host", ""), settings.get("smtp_from", "")
        if not host or not sender:
            raise ToolError("e-mail is not set up: smtp_host and smtp_from are needed in the settings")
        starttls = settings.get("smtp_starttls", "false").lower() in ("1", "true", "yes")
        try:
            port = int(settings.get("smtp_port") or (587 if starttls else 25))
        except ValueError:
            raise ToolError(f"smtp_port '{settings['smtp_port']}' is not a number") from None
        password = settings.get("smtp_password") or os.environ.get("SMTP_PASSWORD", "")
        return cls(host, port, sender, starttls, settings.get("smtp_username", ""), password, settings.get("smtp_ca_file", ""))


@dataclass(frozen=True)
class Received:
    sender: str
    subject: str
    date: datetime  # in the user's zone
    snippet: str


def recipients(to: str) -> list[str]:
    """The addresses in 'bob@example.com, Ann <ann@example.org>', each checked for an @ and a domain."""
    found = [address for _, address in getaddresses([to]) if address]
    if not found:
        raise ToolError(f"'{to}' is not an e-mail address")
    for address in found:
        local, _, domain = address.rpartition("@")
        if not local or "." not in domain or " " in address:
            raise ToolError(f"'{address}' is not an e-mail address")
    return found


def compose(smtp: SmtpSettings, to: str, subject: str, body: str, now: datetime) -> EmailMessage:
    message = EmailMessage()
    subject = " ".join(subject.split())  # a header is one line
    message["From"], message["To"], message["Subject"] = smtp.sender, ", ".join(recipients(to)), subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=parseaddr(smtp.sender)[1].rpartition("@")[2] or None)
    message.set_content(body)
    return message


def send(smtp: SmtpSettings, message: EmailMessage) -> None:
    """Blocking: run it in a thread. Every failure becomes a ToolError saying what to fix."""
    where = f"{smtp.host}:{smtp.port}"
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=TIMEOUT_S) as client:
            if smtp.starttls:
                client.starttls(context=_tls_context(smtp.ca_file))
            if smtp.username:
                client.login(smtp.username, smtp.password)
            client.send_message(message)
    except smtplib.SMTPRecipientsRefused as error:
        refused = "; ".join(f"{address} ({code} {_text(reply)})" for address, (code, reply) in error.recipients.items())
        raise ToolError(f"the mail server refused the recipient {refused}") from None
    except smtplib.SMTPSenderRefused as error:
        reply = f"{error.smtp_code} {_text(error.smtp_error)}"
        raise ToolError(f"the mail server refused the sender {smtp.sender}: {reply}") from None
    except smtplib.SMTPAuthenticationError:
        raise ToolError("the mail server refused the login: check smtp_username and smtp_password") from None
    except smtplib.SMTPNotSupportedError as error:
        raise ToolError(f"the mail server at {where} does not support that: {error}") from None
    except smtplib.SMTPResponseException as error:
        raise ToolError(f"the mail server said {error.smtp_code}: {_text(error.smtp_error)}") from None
    except smtplib.SMTPException as error:
        raise ToolError(f"sending through {where} failed: {error}") from None
    except ssl.SSLError as error:
        raise ToolError(f"the secure connection to {where} failed: {error.reason}") from None
    except OSError as error:  # refused, unreachable, unknown host, timed out
        raise ToolError(f"the mail server at {where} cannot be reached ({error.strerror or error})") from None


def _tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context()  # verifies the server's certificate and name
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError):
            raise ToolError(f"smtp_ca_file {ca_file} is not a readable PEM certificate file") from None
    return context


def latest(maildir: Path, count: int, tz: ZoneInfo) -> list[Received]:
    """The newest `count` messages, newest first, by their Date header (else their delivery time)."""
    if not maildir.is_dir():
        raise ToolError(f"there is no mailbox at {maildir}")
    box = mailbox.Maildir(maildir, factory=None, create=False)
    messages = []
    for key in box.keys():
        try:
            message = box.get_message(key)
        except (OSError, KeyError):  # removed since the listing
            continue
        messages.append((_date(message, tz), message))
    messages.sort(key=lambda pair: pair[0], reverse=True)
    return [Received(_text(message.get("From", "")), _text(message.get("Subject", "")), when, _snippet(message))
            for when, message in messages[:count]]


def _date(message: mailbox.MaildirMessage, tz: ZoneInfo) -> datetime:
    try:
        when = parsedate_to_datetime(message["Date"]) if message["Date"] else None
    except (TypeError, ValueError):
        when = None
    if when is None or when.tzinfo is None:
        return datetime.fromtimestamp(message.get_date(), tz)  # the time it was delivered
    return when.astimezone(tz)


def _snippet(message: Message) -> str:
    """The start of the first text/plain part, on one line."""
    for part in message.walk():
        if part.get_content_type() == "text/plain" and part.get_content_disposition() != "attachment":
            payload = part.get_payload(decode=True) or b""
            text = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
            words = " ".join(text.split())
            return words if len(words) <= SNIPPET_CHARS else words[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " …"
    return ""


def _text(value: Any) -> str:
    """A header (maybe RFC 2047-encoded) or server reply, as plain text."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    try:
        return str(make_header(decode_header(str(value))))
    except (ValueError, LookupError):
        return str(value)


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    def maildir() -> Path:
        return Path(ctx.settings.get("maildir") or ctx.data_dir / "Maildir").expanduser()

    async def send_email(arguments: dict[str, Any]) -> str:
        smtp = SmtpSettings.from_settings(ctx.settings)
        to, subject, body = (required(arguments, name) for name in ("to", "subject", "body"))
        message = compose(smtp, to, subject, body, ctx.now())
        await asyncio.to_thread(send, smtp, message)
        return as_json({"sent": {"to": message["To"], "subject": message["Subject"]}})

    def confirm_send(arguments: dict[str, Any]) -> str:
        return f"Send the email to {arguments.get('to')} with subject '{arguments.get('subject')}'?"

    async def read_latest(arguments: dict[str, Any]) -> str:
        count = arguments.get("count") or 5
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 20:
            raise ToolError("count must be a whole number from 1 to 20")
        found = await asyncio.to_thread(latest, maildir(), count, ctx.tz)  # reads every message's headers
        return as_json({"messages": [
            {"from": item.sender, "subject": item.subject, "date": local_text(item.date, ctx.tz), "snippet": item.snippet}
            for item in found]})

    return [
        Tool("email_send", "Send an e-mail from the user's address.",
             {"type": "object", "required": ["to", "subject", "body"], "properties": {
                 "to": {"type": "string", "description": "address(es), comma-separated"},
                 "subject": {"type": "string"}, "body": {"type": "string", "description": "plain text"}}},
             send_email, confirm=confirm_send),
        Tool("email_read_latest", "Read the newest e-mails in the user's mailbox: sender, subject, date and the start of each.",
             {"type": "object", "properties": {"count": {"type": "integer", "description": "how many, default 5"}}},
             read_latest),
    ]
