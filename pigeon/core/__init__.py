"""The core: what Pigeon does with a message, without AMQP.

``messages`` (the plain data that moves, and ``build_outgoing``), ``pipeline``
(the one middleware chain), ``topology`` (exchanges, queues and bindings as
data), ``listener`` (``Listener`` and ``Context``) and ``processor``
(``Delivery`` and the ``Processor`` that decides an outcome). Nothing here
imports the broker layer (``pigeon.amqp``) or the app; see docs/architecture.md.
"""
