"""E-mail: sending through a real SMTP server (aiosmtpd on 127.0.0.1), with login and refusals,
and reading the newest messages of a real Maildir filled here."""
from __future__ import annotations

import email
import json
import mailbox
from email.message import EmailMessage
from email.policy import default

import pytest

from assistant.backends import UTC, closed_port, make_ctx, server_tls, smtp_server, tool
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import email as email_tools

LUNCH = {"to": "bob@example.com", "subject": "Lunch", "body": "Shall we meet at noon?"}


def smtp_ctx(tmp_path, port, **settings):
    return make_ctx(tmp_path, smtp_host="127.0.0.1", smtp_port=str(port), smtp_from="Alice <alice@example.org>", **settings)


async def test_an_email_is_sent_after_the_user_confirms(tmp_path):
    async with smtp_server() as server:
        send = tool(email_tools.tools(smtp_ctx(tmp_path, server.port)), "email_send")
        assert send.confirm(LUNCH) == "Send the email to bob@example.com with subject 'Lunch'?"
        assert json.loads(await call(send, LUNCH)) == {"sent": {"to": "bob@example.com", "subject": "Lunch"}}
    [envelope] = server.received
    assert envelope.mail_from == "alice@example.org" and envelope.rcpt_tos == ["bob@example.com"]
    message = email.message_from_bytes(envelope.original_content, policy=default)
    assert message["Subject"] == "Lunch" and message["From"] == "Alice <alice@example.org>"
    assert message["Date"] == "Tue, 01 Dec 2026 10:00:00 +0100"  # the context's clock, in the user's zone
    assert message.get_content().strip() == "Shall we meet at noon?"


async def test_login_and_several_recipients(tmp_path):
    async with smtp_server(logins={"alice": "s3cret"}) as server:
        ctx = smtp_ctx(tmp_path, server.port, smtp_username="alice", smtp_password="s3cret")
        await call(tool(email_tools.tools(ctx), "email_send"),
                   LUNCH | {"to": "bob@example.com, Ann <ann@example.net>", "subject": "Lunch\r\nBcc: eve@example.com"})
        assert server.received[0].rcpt_tos == ["bob@example.com", "ann@example.net"]  # no header smuggled in the subject
        assert email.message_from_bytes(server.received[0].original_content)["Subject"] == "Lunch Bcc: eve@example.com"

        ctx = smtp_ctx(tmp_path, server.port, smtp_username="alice", smtp_password="wrong-password")
        with pytest.raises(ToolError, match="refused the login: check smtp_username and smtp_password") as caught:
            await call(tool(email_tools.tools(ctx), "email_send"), LUNCH)
        assert "wrong-password" not in str(caught.value)
        assert len(server.received) == 1


async def test_refusals_and_bad_input_are_explained(tmp_path):
    async with smtp_server(refuse=("nobody@example.com",)) as server:
        tools = email_tools.tools(smtp_ctx(tmp_path, server.port))
        for arguments, message in [
            (LUNCH | {"to": "nobody@example.com"}, r"refused the recipient nobody@example.com \(550 5.1.1 no such user here\)"),
            (LUNCH | {"to": "bob"}, "'bob' is not an e-mail address"),
            (LUNCH | {"to": "bob@localhost"}, "'bob@localhost' is not an e-mail address"),
            ({"to": "bob@example.com", "subject": "Lunch"}, "missing argument 'body'"),
        ]:
            with pytest.raises(ToolError, match=message):
                await call(tool(tools, "email_send"), arguments)
        assert server.received == []

    port = closed_port()
    with pytest.raises(ToolError, match=f"the mail server at 127.0.0.1:{port} cannot be reached"):
        await call(tool(email_tools.tools(smtp_ctx(tmp_path, port)), "email_send"), LUNCH)
    with pytest.raises(ToolError, match="smtp_host and smtp_from are needed"):
        await call(tool(email_tools.tools(make_ctx(tmp_path)), "email_send"), LUNCH)


def add(box, sender, subject, date, body, html=None):
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, "alice@example.org", subject
    if date:
        message["Date"] = date
    message.set_content(body)
    if html:
        message.add_alternative(html, subtype="html")
    box.add(message)


async def test_the_newest_messages_are_read_from_the_maildir(tmp_path):
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    add(box, "Bob <bob@example.com>", "Lunch?", "Mon, 30 Nov 2026 12:00:00 +0000", "Noon at the usual place.")
    add(box, "bank@example.net", "Your statement", "Tue, 01 Dec 2026 07:30:00 +0000", "Your statement\n\nis   ready.",
        html="<p>Your statement is ready.</p>")
    add(box, "=?utf-8?q?Ren=C3=A9e?= <renee@example.fr>", "=?utf-8?q?Caf=C3=A9_demain?=", "Sun, 29 Nov 2026 09:00:00 +0100",
        "word " * 100)
    ctx = make_ctx(tmp_path)  # Paris
    read = tool(email_tools.tools(ctx), "email_read_latest")
    messages = json.loads(await call(read, {"count": 2}))["messages"]
    assert messages == [
        {"from": "bank@example.net", "subject": "Your statement", "date": "2026-12-01 08:30",
         "snippet": "Your statement is ready."},
        {"from": "Bob <bob@example.com>", "subject": "Lunch?", "date": "2026-11-30 13:00", "snippet": "Noon at the usual place."}]
    oldest = json.loads(await call(read, {}))["messages"][-1]
    assert oldest["from"] == "Renée <renee@example.fr>" and oldest["subject"] == "Café demain"
    assert len(oldest["snippet"]) <= email_tools.SNIPPET_CHARS + 2 and oldest["snippet"].endswith(" …")
    in_utc = json.loads(await call(tool(email_tools.tools(make_ctx(tmp_path, tz=UTC)), "email_read_latest"), {"count": 1}))
    assert in_utc["messages"][0]["date"] == "2026-12-01 07:30"


async def test_reading_bad_input_is_explained(tmp_path):
    read = tool(email_tools.tools(make_ctx(tmp_path)), "email_read_latest")
    with pytest.raises(ToolError, match="there is no mailbox at"):
        await call(read, {})
    mailbox.Maildir(tmp_path / "Maildir", create=True)
    assert json.loads(await call(read, {})) == {"messages": []}
    with pytest.raises(ToolError, match="count must be a whole number from 1 to 20"):
        await call(read, {"count": 0.5})


async def test_starttls_to_a_server_with_its_own_ca(tmp_path):
    ca_file, tls = server_tls(tmp_path)
    async with smtp_server(logins={"alice": "s3cret"}, tls=tls) as server:
        secure = {"smtp_starttls": "true", "smtp_username": "alice", "smtp_password": "s3cret"}
        ctx = smtp_ctx(tmp_path, server.port, smtp_ca_file=str(ca_file), **secure)
        await call(tool(email_tools.tools(ctx), "email_send"), LUNCH)
        assert len(server.received) == 1

        for settings, message in [
            (secure, "the secure connection to 127.0.0.1:.* failed"),  # the CA is not trusted
            ({}, "refused the sender Alice <alice@example.org>: 530 Must issue a STARTTLS command first"),
            (secure | {"smtp_ca_file": str(tmp_path / "missing.pem")}, "smtp_ca_file .* is not a readable PEM"),
        ]:
            with pytest.raises(ToolError, match=message):
                await call(tool(email_tools.tools(smtp_ctx(tmp_path, server.port, **settings)), "email_send"), LUNCH)
        assert len(server.received) == 1
