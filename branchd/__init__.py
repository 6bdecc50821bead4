"""branchd: a decentralized supervisor for clusters of Celery workers."""

__version__ = "0.1.0"
