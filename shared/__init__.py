"""tuneloop: fine-tuning of language models as event-driven microservices over NATS.

This package (``shared/`` in the repo) is what every service imports: the typed events,
their subjects and topology, the bus over nats-py, configuration, storage, the Prometheus
exporter. Each service lives in its own sub-package (``tuneloop.trainer`` ...); the
operator's side (the CLI and what it runs) in ``tuneloop.tools``, which no service imports.
"""

__version__ = "0.1.0"
