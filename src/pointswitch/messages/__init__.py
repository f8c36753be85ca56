"""The information transceiver: messages to members and merchants.

The database queues them (the outbox, written by triggers in the transaction of
the event: ``ledger.outbox``); this package delivers them: templates per kind
and language, the channels (SMS gateway, SMTP, signed webhook) and the worker
that claims, sends and marks. It knows the ledger's outbox queries and the
channels' protocols, nothing of ISO 8583.
"""

from .channels import Channel, Outgoing, SendError, build_channels, signature
from .worker import Messenger

__all__ = ["Channel", "Messenger", "Outgoing", "SendError", "build_channels", "signature"]
