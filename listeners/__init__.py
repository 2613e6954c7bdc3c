"""The order story: example services that react to each other's events.

``orders`` dispatches ``order.placed``; ``notification``, ``seller`` and
``logistics`` each listen on their own, and never call one another. Run one
with ``pigeon listen listeners.notification:app``, all of them with
``make demo`` (``supervisord.conf``) or ``docker compose up``.
"""
