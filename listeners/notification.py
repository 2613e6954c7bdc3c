"""Notification: emails the customer when an order is placed and when its delivery is booked.

    pigeon listen listeners.notification:app

The emails are real RFC 5322 messages, written as ``.eml`` files into
``NOTIFICATION_MAIL_DIR`` (default ``var/mail``): open one in any mail client.
A real service would hand them to an SMTP server or a mail API instead.
``NOTIFICATION_SEND_DELAY`` (seconds) plays a slow mail server: set it to 5,
then ``supervisorctl stop notification`` and watch the emails in flight
still go out before the process exits.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from pathlib import Path

from listeners.events import DeliveryAssigned, OrderPlaced
from pigeon import Context, Pigeon, Retry

# The service name starts every queue name (notification.send-confirmation).
# PIGEON_SERVICE renames it, to run a second copy of the story next to the first.
app = Pigeon(service=os.environ.get("PIGEON_SERVICE") or "notification")

MAIL_DIR = Path(os.environ.get("NOTIFICATION_MAIL_DIR", "var/mail"))
SEND_DELAY = float(os.environ.get("NOTIFICATION_SEND_DELAY", "0"))
SENDER = ("Pigeon Shop", "orders@shop.example")


# Plain `def` handlers run in pigeon's thread pool, so blocking I/O (files,
# SMTP) is fine here and does not hold up the other messages. A failing send
# is tried again after 1 s, 5 s, 30 s and 30 s, then waits in LetterThief.
@app.listener(OrderPlaced, retry=Retry(attempts=5, delays=[1, 5, 30]))
def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
    lines = "\n".join(
        f"  {item.quantity:>2} x {item.name:<28} "
        f"{money(item.quantity * item.unit_price_cents, event.currency):>14}"
        for item in event.items
    )
    body = (
        f"Hello {event.customer_name},\n\n"
        f"thank you for your order {event.order_id}:\n\n{lines}\n\n"
        f"  {'Total':<33} {money(event.total_cents, event.currency):>14}\n\n"
        "We will write again as soon as a delivery partner has your parcel.\n"
    )
    message = compose(
        event.customer_name, event.customer_email, f"Your order {event.order_id}", body, ctx
    )
    # One file per order and kind: a redelivered or replayed event overwrites
    # the same file instead of sending the customer a second email.
    send(message, f"{event.order_id}.confirmation.eml", ctx)


@app.listener(DeliveryAssigned)
def send_tracking(event: DeliveryAssigned, ctx: Context) -> None:
    body = (
        f"Hello {event.customer_name},\n\n"
        f"your order {event.order_id} is on its way with {event.partner}.\n"
        f"Tracking code: {event.tracking_code}\n"
        f"Follow it at {event.tracking_url}\n"
    )
    message = compose(
        event.customer_name,
        event.customer_email,
        f"Your order {event.order_id} ships with {event.partner}",
        body,
        ctx,
    )
    send(message, f"{event.order_id}.tracking.eml", ctx)


def money(cents: int, currency: str = "EUR") -> str:
    return f"{cents / 100:,.2f} {currency}"


def compose(name: str, address: str, subject: str, body: str, ctx: Context) -> EmailMessage:
    message = EmailMessage()
    message["From"] = formataddr(SENDER)
    message["To"] = formataddr((name, address))
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    # The bus's ids travel with the email, so support can go from a customer's
    # complaint to the events (LetterThief searches by correlation id).
    message["X-Pigeon-Message-Id"] = ctx.message_id
    message["X-Pigeon-Correlation-Id"] = ctx.correlation_id or ctx.message_id
    message.set_content(body)
    return message


def send(message: EmailMessage, filename: str, ctx: Context) -> None:
    ctx.log.info("email.sending", to=message["To"], file=filename)
    if SEND_DELAY:
        time.sleep(SEND_DELAY)
    MAIL_DIR.mkdir(parents=True, exist_ok=True)
    path = MAIL_DIR / filename
    partial = path.with_name(f".{filename}.{uuid.uuid4().hex}.partial")
    partial.write_bytes(message.as_bytes())
    os.replace(partial, path)  # atomic: a reader never sees half an email
    ctx.log.info("email.sent", to=message["To"], file=str(path))
