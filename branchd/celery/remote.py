"""Celery's remote-control protocol spoken with kombu alone.

Wire format (kombu's ``Mailbox`` as Celery configures it, celery/kombu 5.7):
a request is published to the fanout exchange ``celery.pidbox`` as JSON::

    {"method": "ping", "arguments": {}, "destination": ["w1@host"],
     "pattern": None, "matcher": None,
     "ticket": "<uuid>", "reply_to": {"exchange": "reply.celery.pidbox",
                                      "routing_key": "<our oid>"}}

and the node answers on the direct exchange ``reply.celery.pidbox`` with
``{"w1@host": <reply>}`` and the ticket in the message *headers*. A cast (no
reply wanted) leaves out ``ticket`` and ``reply_to``.

Why not ``kombu.pidbox.Mailbox``: it mixes late replies into later calls
(its ``unclaimed`` buffer) and blocks on close with Redis. Here each broker
gets one long-lived reply queue, consumed by one thread; every call has its
own ticket and a future, replies are matched by ticket, and a reply whose
call has ended is dropped.

kombu is imported on first use (:func:`_kombu`, when the first broker link
is made or the first connection built), not with this module: a branch with
no Celery app never needs it, and kombu with its transports is about 6 MiB
of the daemon's resident memory (issue 10, part 9).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from branchd.celery import outage
from branchd.celery.broker import CONTROL_EXCHANGE, REPLY_EXCHANGE, BrokerSpec
from branchd.errors import BrokerMisconfigured, BrokerUnavailable

__all__ = [
    "BrokerMisconfigured",
    "BrokerUnavailable",
    "ConnectionFactory",
    "KombuRemoteControl",
    "RemoteControl",
    "request_body",
]

log = logging.getLogger(__name__)

Reply = dict[str, Any]

#: The first reconnect of a lost reply queue comes this soon; each failure
#: doubles the wait up to the link's backoff_max.
RETRY_FIRST = 0.1

#: Builds a (not yet connected) kombu connection to a broker; ``connect_timeout``
#: in seconds. A seam: tests inject failures (a transport that does not load).
ConnectionFactory = Callable[[BrokerSpec, float], Any]


@dataclass(frozen=True)
class _Kombu:
    """The parts of kombu this module uses, loaded by :func:`_kombu`.

    kombu is only partly annotated (untyped calls under --strict): it is used
    through Any.
    """

    Connection: Any
    Consumer: Any
    Producer: Any
    Queue: Any
    OperationalError: type[Exception]
    control: Any  # the fanout exchange requests go to
    replies: Any  # the direct exchange replies come back on
    fs_transport: Any  # the embedded broker's transport class (it subclasses kombu's)


@functools.cache
def _kombu() -> _Kombu:
    """Import kombu (once): lazily, so that a branch without Celery apps never loads it."""
    from kombu import connection, entity, messaging
    from kombu.exceptions import OperationalError

    from branchd.celery import fs_transport  # subclasses kombu's filesystem transport

    exchange: Any = entity.Exchange
    return _Kombu(
        Connection=connection.Connection,
        Consumer=messaging.Consumer,
        Producer=messaging.Producer,
        Queue=entity.Queue,
        OperationalError=OperationalError,
        control=exchange(CONTROL_EXCHANGE, type="fanout", durable=False, delivery_mode="transient"),
        replies=exchange(REPLY_EXCHANGE, type="direct", durable=False, delivery_mode="transient"),
        fs_transport=fs_transport.Transport,
    )


def kombu_connection(spec: BrokerSpec, connect_timeout: float) -> Any:
    """The real connection factory (raises ImportError if the transport does not load)."""
    kombu = _kombu()
    return kombu.Connection(
        spec.url,
        transport=kombu.fs_transport if spec.is_filesystem else None,
        transport_options=dict(spec.transport_options),
        connect_timeout=connect_timeout,
    )


def describe_failure(spec: BrokerSpec, exc: BaseException) -> str:
    """Why a connection to ``spec`` failed, in a few words and without its password.

    A transport that cannot be imported is a broken installation, not a broker
    that cannot be reached: say which transport and what is missing.
    """
    if isinstance(exc, ImportError):
        return f"the {spec.transport} transport cannot be loaded: {_describe(exc)}"
    return _describe(exc)


def failure_error(spec: BrokerSpec, exc: BaseException, prefix: str) -> BrokerUnavailable:
    """The error to raise for ``exc``: BrokerMisconfigured for a transport that does not load."""
    cls = BrokerMisconfigured if isinstance(exc, ImportError) else BrokerUnavailable
    return cls(f"{prefix}: {describe_failure(spec, exc)}")


class RemoteControl(Protocol):
    async def call(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = 1.0,
    ) -> Reply | None:
        """The node's reply body (``{"ok": "pong"}``), None if none came within ``timeout``.

        Raises BrokerUnavailable if the request could not be published in time.
        """
        ...

    async def cast(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Send one-way (``shutdown`` never replies)."""
        ...

    def connects(self, broker: BrokerSpec) -> int:
        """How many times this side's connection to ``broker`` was (re)made."""
        ...

    async def close(self) -> None: ...


def request_body(
    command: str,
    arguments: Mapping[str, Any] | None,
    node: str,
    ticket: str | None = None,
    reply_key: str | None = None,
) -> dict[str, Any]:
    """The message Celery's ``Mailbox._publish`` sends; ``destination`` is always a list.

    (A bare string destination is tested with ``hostname in destination``, a
    substring match: ``"w1@h"`` would also reach ``"w1@h2"``'s neighbour ``"w1@h"``.)
    """
    body: dict[str, Any] = {
        "method": command,
        "arguments": dict(arguments or {}),
        "destination": [node],
        "pattern": None,
        "matcher": None,
    }
    if ticket is not None and reply_key is not None:
        body["ticket"] = ticket
        body["reply_to"] = {"exchange": REPLY_EXCHANGE, "routing_key": reply_key}
    return body


class KombuRemoteControl:
    """RemoteControl over real brokers, one :class:`_BrokerLink` per broker spec."""

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        backoff_max: float = 2.0,
        close_timeout: float = 3.0,
        connection_factory: ConnectionFactory = kombu_connection,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._backoff_max = backoff_max
        self._close_timeout = close_timeout
        self._connection_factory = connection_factory
        self._links: dict[BrokerSpec, _BrokerLink] = {}
        self._closed = False

    def _link(self, broker: BrokerSpec) -> _BrokerLink:
        if self._closed:
            raise BrokerUnavailable("remote control is closed")
        link = self._links.get(broker)
        if link is None:
            link = _BrokerLink(
                broker,
                asyncio.get_running_loop(),
                self._connect_timeout,
                self._backoff_max,
                self._connection_factory,
            )
            self._links[broker] = link
            link.start()
        return link

    async def call(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = 1.0,
    ) -> Reply | None:
        return await self._link(broker).call(node, command, arguments, timeout)

    async def cast(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        await self._link(broker).cast(node, command, arguments, self._connect_timeout)

    def connects(self, broker: BrokerSpec) -> int:
        """How many times the reply queue on ``broker`` has (re)connected: a
        change means the broker was away, and its workers may have lost
        consumers added at runtime."""
        link = self._links.get(broker)
        return link.connects if link else 0

    def health(self, broker: BrokerSpec) -> outage.Outage | None:
        """How the reply queue on ``broker`` fares (None: never used); a snapshot."""
        link = self._links.get(broker)
        return link.outage if link else None

    async def close(self) -> None:
        self._closed = True
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close(self._close_timeout) for link in links))


class _BrokerLink:
    """One broker: a consumer thread owning the reply queue, a publisher thread.

    kombu connections are blocking and not thread-safe, so each thread owns its
    own connection. Two connections rather than one so that a publish never
    waits behind a ``drain_events`` timeout. Results cross to the event loop
    with ``call_soon_threadsafe``; ``_pending`` is touched on the loop only.
    """

    def __init__(
        self,
        spec: BrokerSpec,
        loop: asyncio.AbstractEventLoop,
        connect_timeout: float,
        backoff_max: float,
        connection_factory: ConnectionFactory = kombu_connection,
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.oid = uuid.uuid4().hex
        self.queue = _kombu().Queue(
            f"{self.oid}.{REPLY_EXCHANGE}",
            exchange=_kombu().replies,
            routing_key=self.oid,
            durable=False,
            exclusive=True,
            auto_delete=True,
            expires=10.0,  # RabbitMQ drops it 10 s after we vanish, like Celery's own
        )
        self._connect_timeout = connect_timeout
        self._backoff_max = backoff_max
        self._connection_factory = connection_factory
        self._pending: dict[str, tuple[str, asyncio.Future[Reply | None]]] = {}
        self._ready = asyncio.Event()
        self._stop = threading.Event()
        self._consumer = threading.Thread(
            target=self._consume_forever, name=f"branchd-pidbox-rx {spec.redacted()}", daemon=True
        )
        self._publisher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"branchd-pidbox-tx {spec.redacted()}"
        )
        self._tx_conn: Any = None
        self._retry_in = RETRY_FIRST
        #: Why the reply queue's last connection attempt failed (for error messages).
        self.last_error: str | None = None
        #: The last failure was a transport that does not load (a configuration error).
        self._misconfigured = False
        #: What the reply queue's connection has said about its failures (logging only).
        self.outage = outage.Outage()
        #: Connections made by the reply queue (an int, read across threads).
        self.connects = 0

    def start(self) -> None:
        self._consumer.start()

    # -- event-loop side -------------------------------------------------

    async def call(
        self, node: str, command: str, arguments: Mapping[str, Any] | None, timeout: float
    ) -> Reply | None:
        deadline = time.monotonic() + timeout
        ticket = uuid.uuid4().hex
        future: asyncio.Future[Reply | None] = self.loop.create_future()
        self._pending[ticket] = (node, future)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                if self._misconfigured:  # not an outage: do not say "within"
                    why = f"{self.spec.redacted()}: {self.last_error}"
                    raise BrokerMisconfigured(why) from None
                why = f": {self.last_error}" if self.last_error else ""
                raise BrokerUnavailable(
                    f"no connection to {self.spec.redacted()} within {timeout}s{why}"
                ) from None
            body = request_body(command, arguments, node, ticket, self.oid)
            await self._publish(body, deadline)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    return await future
            except TimeoutError:
                return None
        finally:
            self._pending.pop(ticket, None)

    async def cast(
        self, node: str, command: str, arguments: Mapping[str, Any] | None, timeout: float
    ) -> None:
        await self._publish(request_body(command, arguments, node), time.monotonic() + timeout)

    async def _publish(self, body: dict[str, Any], deadline: float) -> None:
        job = self.loop.run_in_executor(self._publisher, self._publish_blocking, body, deadline)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await job
        except TimeoutError:
            raise BrokerUnavailable(
                f"could not publish to {self.spec.redacted()} in time"
            ) from None
        except BrokerUnavailable:
            raise
        except Exception as exc:  # kombu/driver errors vary by transport
            raise failure_error(
                self.spec, exc, f"publish to {self.spec.redacted()} failed"
            ) from exc

    def _on_reply(self, ticket: str | None, body: Any) -> None:
        entry = self._pending.get(ticket) if ticket else None
        if entry is None:
            log.debug("dropping reply for ended or unknown ticket %s", ticket)
            return
        node, future = entry
        if not isinstance(body, dict) or node not in body:
            log.debug("dropping reply for ticket %s from an unexpected node: %r", ticket, body)
            return
        if not future.done():
            reply = body[node]
            future.set_result(reply if isinstance(reply, dict) else {"ok": reply})

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    async def close(self, timeout: float) -> None:
        self._stop.set()
        for _node, future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("remote control closed"))
        await asyncio.to_thread(self._consumer.join, timeout)
        if self._consumer.is_alive():
            log.warning("pidbox consumer for %s did not stop in %ss", self.spec.redacted(), timeout)
        done = self.loop.run_in_executor(self._publisher, self._close_tx)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await done
        self._publisher.shutdown(wait=False, cancel_futures=True)

    # -- publisher thread ------------------------------------------------

    def _connection(self) -> Any:
        return self._connection_factory(self.spec, self._connect_timeout)

    def _connect(self, conn: Any) -> None:
        # one attempt and one immediate retry; the callers pace further attempts.
        # (kombu's defaults, used by a bare ``default_channel``, retry forever
        # with sleeps up to 30 s, which would wedge a thread while the broker is down.)
        conn.ensure_connection(
            max_retries=1,
            interval_start=0,
            interval_step=0,
            interval_max=0,
            timeout=self._connect_timeout,
        )

    def _publish_blocking(self, body: dict[str, Any], deadline: float) -> None:
        if time.monotonic() > deadline:
            raise BrokerUnavailable("publish deadline passed while queued")
        for attempt in (1, 2):
            try:
                # inside the try: building a connection fails too (a transport
                # that does not load), and the caller gets the real cause
                if self._tx_conn is None:
                    self._tx_conn = self._connection()
            except Exception as exc:
                raise failure_error(self.spec, exc, "publish failed") from exc
            conn = self._tx_conn
            kombu = _kombu()
            try:
                self._connect(conn)
                producer = kombu.Producer(conn.default_channel, auto_declare=False)
                producer.publish(
                    body,
                    exchange=kombu.control,
                    declare=[kombu.control],
                    serializer="json",
                    headers={
                        "clock": 0,
                        "expires": time.time() + max(0.0, deadline - time.monotonic()),
                    },
                )
                return
            except (
                *conn.connection_errors,
                *conn.channel_errors,
                OSError,
                kombu.OperationalError,
            ) as exc:
                # a stale connection (broker restarted): drop it, try once on a new one
                self._drop_tx()
                if attempt == 2 or time.monotonic() > deadline:
                    raise failure_error(self.spec, exc, "publish failed") from exc
                log.info("pidbox publisher reconnecting to %s: %r", self.spec.redacted(), exc)

    def _drop_tx(self) -> None:
        conn, self._tx_conn = self._tx_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()  # frees resources without talking to a dead broker

    def _close_tx(self) -> None:
        conn, self._tx_conn = self._tx_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    # -- consumer thread -------------------------------------------------

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, body: Any, message: Any) -> None:
        self._notify(self._on_reply, message.headers.get("ticket"), body)

    def _consume_forever(self) -> None:
        """Keep the reply queue consumed until closed; never ends on a failure.

        Every failure, building the connection included (a transport that
        does not load raises ImportError there), is retried with backoff up
        to ``backoff_max``; what is logged about it is paced by ``outage``.
        """
        self._retry_in = RETRY_FIRST
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = self._connection()
                self._connect(conn)
                self._consume(conn)
            except Exception as exc:
                self._notify(self._set_ready, False)
                self._misconfigured = isinstance(exc, ImportError)
                self.last_error = describe_failure(self.spec, exc)
                if self._stop.is_set():
                    break
                self._report_failure(self.last_error, self._retry_in)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.collect()
                self._stop.wait(self._retry_in)
                self._retry_in = min(self._retry_in * 2, self._backoff_max)
                continue
            with contextlib.suppress(Exception):
                conn.release()
        self._notify(self._set_ready, False)

    def _report_failure(self, cause: str, retry_in: float) -> None:
        self.outage, say = outage.failed(self.outage, cause, time.monotonic())
        where = self.spec.redacted()
        if say == outage.Say.FAILED:
            log.warning(
                "pidbox reply queue on %s failed: %s (retrying every %.1fs at most)",
                where,
                cause,
                self._backoff_max,
            )
        elif say == outage.Say.STILL:
            # said once as a warning; the reminders are information
            log.info(
                "pidbox reply queue on %s still failing (%d attempts in %.0fs): %s",
                where,
                self.outage.attempts,
                time.monotonic() - self.outage.since,
                cause,
            )
        else:
            log.debug(
                "pidbox reply queue on %s failed: %s (again in %.1fs)", where, cause, retry_in
            )

    def _consume(self, conn: Any) -> None:
        channel = conn.channel()
        consumer = _kombu().Consumer(
            channel, [self.queue], no_ack=True, accept=["json"], callbacks=[self._on_message]
        )
        consumer.consume()  # declares and binds the queue first
        self.connects += 1
        self._notify(self._set_ready, True)
        self._retry_in = RETRY_FIRST  # a later outage starts at the fast pace again
        self.last_error = None
        self._misconfigured = False
        self.outage, say = outage.recovered(self.outage)
        if say == outage.Say.RECOVERED:
            log.info("pidbox reply queue on %s works again", self.spec.redacted())
        log.debug("pidbox reply queue %s ready on %s", self.queue.name, self.spec.redacted())
        heartbeat = getattr(conn, "heartbeat", 0) or 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):  # socket.timeout is TimeoutError
                conn.drain_events(timeout=0.25)
            if heartbeat:
                conn.heartbeat_check()
        with contextlib.suppress(Exception):
            consumer.cancel()
        with contextlib.suppress(Exception):
            # explicit: only RabbitMQ drops an auto-delete queue with its consumer;
            # kombu's Redis and filesystem channels would keep its binding forever
            channel.queue_delete(self.queue.name)


def _describe(exc: BaseException) -> str:
    """A connection error in a few words, without the broker's password."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
