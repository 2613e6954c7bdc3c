"""The broker: the one subpackage that imports aiormq and pamqp.

Everything above this layer (the app, the worker, LetterThief) reaches
RabbitMQ through the names below, never through a channel of its own:

- :class:`Connector`: one connection per event loop, with failover;
- :func:`declare`: declare a :class:`~pigeon.core.topology.Topology`;
- :class:`Publisher`: publish with confirm (``publish``, ``publish_many``);
- :class:`Subscription` and :func:`delivery_of`: the deliveries of one queue,
  as broker-free :class:`~pigeon.core.processor.Delivery` objects;
- :class:`Acker`: settle them (ack, give back), once per loop turn;
- :data:`RETRYABLE`: the errors a later try can cure;
- :func:`check_encodable`: what a publish of a message would refuse before sending it;
- :func:`supervise` and :func:`backoff`: the one reconnect loop (connect with
  backoff, start, run until the connection is lost, again until stopped).

The modules behind it: ``connection``, ``declaring``, ``frames`` (encoding
and the fast path's one attach point), ``acks`` and ``publishes`` (the two
users of the per-turn ``frames.TurnWriter``), ``publisher``, ``consume``,
``unmarshal`` (tolerant header decoding), ``hints`` and ``reconnect`` (``supervise``). Their aiormq
internals are pinned by ``pyproject.toml`` and ``tests/test_aiormq_contract.py``.
"""

from pigeon.amqp.acks import Acker
from pigeon.amqp.connection import Connector
from pigeon.amqp.consume import Incoming, OnDelivery, Subscription, delivery_of
from pigeon.amqp.declaring import declare
from pigeon.amqp.frames import check_encodable
from pigeon.amqp.publisher import RETRYABLE, Publisher
from pigeon.amqp.reconnect import backoff, supervise

__all__ = [
    "RETRYABLE",
    "Acker",
    "Connector",
    "Incoming",
    "OnDelivery",
    "Publisher",
    "Subscription",
    "backoff",
    "check_encodable",
    "declare",
    "delivery_of",
    "supervise",
]
