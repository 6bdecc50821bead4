"""The cluster: membership (pure SWIM), transport, discovery and gossip loops.

Empty until the membership issue; it exists so that the layer rules (no
imports between ``process`` and ``cluster``) are checked from the start.
"""
