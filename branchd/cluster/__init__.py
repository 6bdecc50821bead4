"""The cluster: membership (pure SWIM), transport, discovery and gossip loops.

So far the pure core only: ``membership`` (the SWIM/Lifeguard state machine),
``messages`` (what branches say to each other) and ``timing`` (the timers and
their scaling maths). ``process`` and ``cluster`` never import each other.
"""
