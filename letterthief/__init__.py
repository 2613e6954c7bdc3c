"""LetterThief: every dead letter stored, shown, alerted and replayable.

One process (``letterthief serve``) runs the collector that drains
``pigeon.dead-letters`` and ``pigeon.unrouted`` into a database, the web UI,
the JSON API and the Slack alerter. See ``docs/letterthief.md``.
"""

from letterthief.settings import LetterThiefSettings

__all__ = ["LetterThiefSettings"]
