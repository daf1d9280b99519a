"""tuneloop: fine-tuning of language models as event-driven microservices over NATS.

This package (``shared/`` in the repo) is what every service imports: the typed events,
their subjects, the bus over nats-py, configuration, telemetry and the embedded NATS
server. Each service lives in its own sub-package (``tuneloop.trainer`` ...).
"""

__version__ = "0.1.0"
