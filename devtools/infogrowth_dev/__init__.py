"""infogrowth-dev: the tooling around the infogrowth service, kept out of its package and image.

Benchmarks (``bench``), the quality report (``evaluate``), fault injection (``chaos``), the demo,
synthetic data and the local Kafka brokers (``kafka.broker``, ``kafka.cluster``) used by tests.
Its subcommands reach ``infogrowth`` through the ``infogrowth.commands`` entry points; it uses
only the product's public API.
"""

__version__ = "0.1.0"
