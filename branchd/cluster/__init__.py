"""The cluster: membership (pure SWIM), transport, discovery and gossip loops.

So far the pure core: ``membership`` (the SWIM/Lifeguard state machine),
``messages`` (what branches say to each other), ``timing`` (the timers and
their scaling maths) and ``codec`` (the messages as bytes, in compound
datagrams); and the edge: ``transport`` (the ``Transport`` Protocol, UDP)
with its in-memory twin ``memnet`` (tests only), and ``discovery`` (zeroconf
on a LAN: its TXT record pure, its service feeding ``join``); and the service,
``gossip``, which drives the core over a transport it is given. ``process`` and ``cluster``
never import each other.
"""
