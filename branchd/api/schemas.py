"""JSON Schemas of the API: used to validate requests and served verbatim in
the OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

from branchd.model import (
    FOREVER,
    MAX_COUNT,
    NAME_PATTERN,
    POOLS,
    QUEUE_NAME_PATTERN,
    STOP_SIGNALS,
    TEMPLATE_RULE,
    Autorestart,
    Desired,
    Kind,
    State,
    StopStep,
)

Schema = dict[str, Any]

_STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_ENV_FILE: Schema = {"type": "string", "minLength": 2, "maxLength": 4096}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}

#: The fields of an instance a user may set; also an app's instance defaults.
_SETTABLE: dict[str, Schema] = {
    "command": {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "maxItems": 1000,
        "description": "argv list; never run through a shell",
    },
    "env": _STR_MAP,
    "cwd": {"type": ["string", "null"], "minLength": 1},
    "user": {"type": ["string", "null"], "minLength": 1},
    "env_file": {
        "anyOf": [
            _ENV_FILE,
            {"type": "array", "items": _ENV_FILE, "maxItems": 100},
            {"type": "null"},
        ],
        "description": "absolute path(s) of files in systemd's EnvironmentFile syntax, "
        "read at each start (a leading '-': skipped when missing); between the app's env "
        "and the instance's own",
    },
    "umask": {
        "anyOf": [
            # (the integer first: the body's 18.0 is made an int by its schema)
            {"type": "integer", "minimum": 0, "maximum": 0o777},
            {"type": "string", "pattern": "^(0[oO])?[0-7]{1,4}$"},
            {"type": "null"},
        ],
        "description": "the child's umask: an octal string (022) or its value; null: the daemon's",
    },
    "memory_max": {
        "type": ["integer", "null"],
        "minimum": 1024 * 1024,
        "maximum": 2**50,
        "description": "cgroup limit of the whole tree's memory, swap included (bytes): the "
        "kernel's OOM killer ends it there; null: none",
    },
    "cpu_max": {
        "type": ["number", "null"],
        "minimum": 0.01,
        "maximum": 4096,
        "description": "cgroup limit of the whole tree's cpu, a share of one core (0.5); "
        "null: none",
    },
    "pids_max": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 4194304,
        "description": "cgroup limit of the whole tree's processes and threads; null: none",
    },
    "autorestart": {"type": "string", "enum": [a.value for a in Autorestart]},
    "exitcodes": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 255},
        "maxItems": 256,
    },
    "startsecs": {"type": "number", "minimum": 0, "maximum": 3600},
    "startretries": {
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 1000},
            {"type": "string", "enum": [FOREVER]},
        ],
        "description": "failed starts in a row before fatal; forever: never fatal "
        "(the backoff stays capped)",
    },
    "stopsignal": {"type": "string", "enum": list(STOP_SIGNALS)},
    "stopwaitsecs": {"type": "number", "minimum": 0, "maximum": 86400},
    "autostart": {"type": "boolean"},
    "log_max_bytes": {"type": "integer", "minimum": 1024, "maximum": 2**40},
    "log_backups": {"type": "integer", "minimum": 0, "maximum": 100},
}

NAME: Schema = {"type": "string", "pattern": NAME_PATTERN}

_SECONDS: Schema = {"type": "number", "minimum": 0.01, "maximum": 86400}
_PROBE: Schema = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 4096},
        {
            "type": "object",
            "required": ["exec"],
            "properties": {
                "exec": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": 1000,
                }
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "description": "tcp:HOST:PORT (connects), http:URL or the URL (a 2xx answer), "
    'exec:COMMAND ARGS or {"exec": [argv]} (exit 0), notify (READY=1 on $NOTIFY_SOCKET); '
    "answered as text; null: none",
}
#: Start order and probes (issue 15, part 3).
_SETTABLE.update(
    {
        "after": {
            "type": "array",
            "items": NAME,
            "maxItems": 100,
            "uniqueItems": True,
            "description": "instances of the same app it starts after: each start waits "
            "until they are running (ready, with a probe)",
        },
        "after_timeout": {
            **_SECONDS,
            "description": "how long a start waits for them; then it is a failed start",
        },
        "priority": {
            "type": "integer",
            "minimum": -(10**6),
            "maximum": 10**6,
            "description": "supervisord's: when the daemon starts (stops) everything, lower "
            "starts first (stops last); default 999",
        },
        "ready": {
            **_PROBE,
            "description": "readiness probe: running means it passed; " + _PROBE["description"],
        },
        "ready_timeout": {
            **_SECONDS,
            "description": "how long a start may take to be ready; then it is a failed start",
        },
        "live": {
            **_PROBE,
            "description": "liveness probe, tried every live_period while running (notify "
            "not allowed); " + _PROBE["description"],
        },
        "live_period": _SECONDS,
        "live_timeout": {**_SECONDS, "description": "how long each try of a probe may take"},
        "live_failures": {
            "type": "integer",
            "minimum": 1,
            "maximum": 1000,
            "description": "liveness failures in a row that restart it",
        },
    }
)
QUEUE_NAME: Schema = {"type": "string", "pattern": QUEUE_NAME_PATTERN}

_ARGV: Schema = {
    "type": "array",
    "items": {"type": "string", "minLength": 1},
    "maxItems": 1000,
}

AUTOSCALE_IN: Schema = {
    "type": "object",
    "required": ["min", "max"],
    "properties": {
        "min": {"type": "integer", "minimum": 0, "maximum": 10000},
        "max": {"type": "integer", "minimum": 1, "maximum": 10000},
    },
    "additionalProperties": False,
}

_POOL: Schema = {"type": "string", "enum": list(POOLS)}

#: The fields of a celery instance a user may set (also app defaults).
_CELERY_SETTABLE: dict[str, Schema] = {
    "queues": {"type": "array", "items": QUEUE_NAME, "maxItems": 100, "uniqueItems": True},
    "autoscale": {"oneOf": [AUTOSCALE_IN, {"type": "null"}]},
    "concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000},
    "pool": {"oneOf": [_POOL, {"type": "null"}]},
    "args": _ARGV,
    "loglevel": {"type": "string", "enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]},
    "hung_after": {"type": "number", "minimum": 1, "maximum": 86400},
    "memory_limit": {"type": ["integer", "null"], "minimum": 1024 * 1024, "maximum": 2**50},
}
_RATE = r"^[0-9]+(\.[0-9]+)?(/[smh])?$"
_TASK_SECONDS: Schema = {"type": ["number", "null"], "minimum": 0.001, "maximum": 10**7}
#: A worker's limits: an app's (its workers' defaults) or an instance's (overrides).
_LIMITS: dict[str, Schema] = {
    "time_limit": {
        **_TASK_SECONDS,
        "description": "hard time limit of each task, seconds (--time-limit; prefork, gevent)",
    },
    "soft_time_limit": {
        **_TASK_SECONDS,
        "description": "soft time limit (SoftTimeLimitExceeded in the task), seconds, below "
        "time_limit (--soft-time-limit; prefork only)",
    },
    "max_tasks_per_child": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 10**9,
        "description": "a pool child is replaced after this many tasks (prefork only)",
    },
    "max_memory_per_child": {
        "type": ["integer", "null"],
        "minimum": 1024,
        "maximum": 2**50,
        "description": "bytes: a pool child whose RSS is over it is replaced after its "
        "current task (--max-memory-per-child, in KiB; prefork only)",
    },
    "prefetch_multiplier": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 10**6,
        "description": "messages reserved per process (--prefetch-multiplier; Celery's is 4)",
    },
    "disable_prefetch": {
        "type": ["boolean", "null"],
        "description": "take a task only when a process is free (--disable-prefetch; Celery 5.6+)",
    },
    "task_overrides": {
        "type": ["object", "null"],
        "additionalProperties": {
            "type": "object",
            "properties": {
                "rate_limit": {"type": ["string", "null"], "pattern": _RATE},
                "time_limit": _TASK_SECONDS,
                "soft_time_limit": _TASK_SECONDS,
            },
            "additionalProperties": False,
        },
        "description": "per task name: rate_limit, time_limit, soft_time_limit, re-applied by "
        "remote control after every start, broker reconnect and drift; on an app, rate_limit "
        "is the total of its running workers on the branch (each gets total / N)",
    },
}
_CELERY_SETTABLE.update(_LIMITS)
_SETTABLE.update(_CELERY_SETTABLE)

INSTANCE_DEFAULTS: Schema = {
    "type": "object",
    "properties": _SETTABLE,
    "additionalProperties": False,
}

#: Scaling on queue depth (issue 16, part 5): ``scale`` of an app.
SCALE_IN: Schema = {
    "type": "object",
    "required": ["on", "per_worker", "min", "max"],
    "properties": {
        "on": QUEUE_NAME,
        "per_worker": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "min": {"type": "integer", "minimum": 0, "maximum": 10000},
        "max": {"type": "integer", "minimum": 1, "maximum": 10000},
        "down_after": {"type": "number", "minimum": 0, "maximum": 86400},
    },
    "additionalProperties": False,
}

#: What ``GET /v1/apps/{app}/queues/{queue}/depth`` answers.
DEPTH: Schema = {
    "type": "object",
    "required": ["ready", "in_flight", "consumers", "at"],
    "properties": {
        "queue": QUEUE_NAME,
        "ready": {"type": "integer", "minimum": 0},
        "in_flight": {"type": "integer", "minimum": 0},
        "consumers": {"type": "integer", "minimum": 0},
        "at": {"type": "number", "description": "wall time of the reading"},
        "running": {
            "type": "integer",
            "minimum": 0,
            "description": "of in_flight, the tasks executing now",
        },
        "unacked": {
            "type": "integer",
            "minimum": 0,
            "description": "Redis only: messages delivered and not acked in the whole "
            "database (kombu's unacked hash does not say which queue)",
        },
        "unanswered": {
            "type": "integer",
            "minimum": 1,
            "description": "workers consuming the queue that did not say in time what they "
            "hold: in_flight is then at least this much, not a count (absent: all answered)",
        },
    },
}

_APP_CELERY: dict[str, Schema] = {
    "broker": {"type": ["string", "null"], "minLength": 1, "maxLength": 2000},
    "celery_app": {"type": ["string", "null"], "pattern": r"^[A-Za-z_][A-Za-z0-9_.:]*$"},
    "python": {"type": ["string", "null"], "minLength": 1},
    "pool": _POOL,
    "args": _ARGV,
    "autoscale": {"oneOf": [AUTOSCALE_IN, {"type": "null"}]},
    "mingle_gossip": {"type": "boolean"},
    "result_backend": {"type": ["string", "null"], "minLength": 1, "maxLength": 2000},
    "scale": {"oneOf": [SCALE_IN, {"type": "null"}]},
    **_LIMITS,
}

APP_IN: Schema = {
    "type": "object",
    "properties": {"env": _STR_MAP, "defaults": INSTANCE_DEFAULTS, **_APP_CELERY},
    "additionalProperties": False,
}

def _or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


#: JSON merge patch (RFC 7386) of an app: env and defaults merge key by key,
#: null removes a key; a null setting goes back to its default.
APP_PATCH: Schema = {
    "type": "object",
    "properties": {
        "env": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "defaults": {
            "type": "object",
            "properties": {k: _or_null(v) for k, v in _SETTABLE.items()},
            "additionalProperties": False,
        },
        **{k: _or_null(v) for k, v in _APP_CELERY.items()},
    },
    "additionalProperties": False,
}

INSTANCE_IN: Schema = {
    "type": "object",
    "properties": {
        "name": NAME,
        "kind": {"type": "string", "enum": [k.value for k in Kind]},
        **_SETTABLE,
    },
    "additionalProperties": False,
}

#: A count create (supervisord's numprocs): ``count`` instances from one set of
#: fields, named by a template. The template's rule is checked by the handler,
#: not by a pattern here: a generator of valid bodies would then make up to
#: MAX_COUNT instances per request.
INSTANCES_IN: Schema = {
    "type": "object",
    "required": ["count", "name"],
    "properties": {
        **INSTANCE_IN["properties"],
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": TEMPLATE_RULE},
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
        "start_at": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
    },
    "additionalProperties": False,
}

#: The body of POST /v1/apps/{app}/instances: one instance, or a count of them.
INSTANCE_CREATE: Schema = {"anyOf": [INSTANCE_IN, INSTANCES_IN]}

#: A patch of an instance: the fields given change, the rest stay. A null field
#: goes back to its default: "none" where null is a value of its own (cwd,
#: umask, probes, cgroup and memory limits), the app's setting for pool,
#: autoscale, concurrency and the limits (task_overrides: none of its own),
#: else the app's instance default, the kind's, or the built-in one; command
#: has none (422).
INSTANCE_PATCH: Schema = {
    "type": "object",
    "properties": {k: _or_null(v) for k, v in _SETTABLE.items()},
    "additionalProperties": False,
    "description": "the fields given change; null puts one back to its default (the "
    "app's setting for pool, autoscale, concurrency and the limits; else the app's "
    "instance default, the kind's, the built-in one); command cannot be reset",
}

APP: Schema = {
    "type": "object",
    "required": ["name", "env", "defaults", "created_at", "broker", "embedded_broker"],
    "properties": {
        "name": NAME,
        "env": _STR_MAP,
        "defaults": INSTANCE_DEFAULTS,
        "created_at": {"type": "number"},
        **_APP_CELERY,
        "broker": {"type": "string"},
        "embedded_broker": {"type": "boolean"},
        "scope": {
            "type": "string",
            "enum": ["branch", "cluster"],
            "description": "branch: its instances run on the branch that declared it "
            "(an app on the embedded broker); cluster: on any branch",
        },
        "branch": {"type": ["string", "null"], "description": "that branch's id"},
    },
}

QUEUE_IN: Schema = {
    "type": "object",
    "properties": {
        "exchange": {"type": ["string", "null"], "pattern": QUEUE_NAME_PATTERN},
        "exchange_type": {"type": "string", "enum": ["direct", "topic", "fanout", "headers"]},
        "routing_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
        "options": {"type": "object"},
    },
    "additionalProperties": False,
}

QUEUE: Schema = {
    "type": "object",
    "required": ["app", "name", "exchange", "exchange_type", "routing_key", "options"],
    "properties": {
        "app": NAME,
        "name": QUEUE_NAME,
        "exchange": {"type": "string"},
        "exchange_type": {"type": "string"},
        "routing_key": {"type": "string"},
        "options": {"type": "object"},
    },
}

CELERY_CONFIG: Schema = {
    "type": "object",
    "required": ["app", "celery_app", "python", "config", "env"],
    "properties": {
        "app": NAME,
        "celery_app": _NULLABLE_STR,
        "python": {"type": "string", "description": "the interpreter of the app's workers"},
        "cwd": {"type": ["string", "null"], "description": "the working directory of its workers"},
        "config": {
            "type": "object",
            "description": "for app.conf.update(...): broker_url, broker_transport_options, "
            "result_backend, task_queues (Celery's dict form)",
            "required": ["broker_url"],
            "properties": {
                "broker_url": {"type": "string"},
                "broker_transport_options": {"type": "object"},
                "result_backend": {"type": "string"},
                "task_queues": {"type": "object", "additionalProperties": {"type": "object"}},
            },
        },
        "env": {
            "description": "the same as environment variables (CELERY_BROKER_URL, "
            "CELERY_RESULT_BACKEND, and branchd's loader for transport options)",
            **_STR_MAP,
        },
    },
}

CONSUMER: Schema = {
    "type": "object",
    "required": ["name", "wanted", "declared", "live"],
    "properties": {
        "name": {"type": "string"},
        "wanted": {"type": "boolean"},
        "declared": {"type": "boolean"},
        "live": {"type": ["boolean", "null"]},
    },
}

_RANGE: Schema = {
    "type": "object",
    "required": ["min", "max"],
    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
}

AUTOSCALE: Schema = {
    "type": "object",
    "required": ["min", "max", "live"],
    "properties": {
        "min": {"type": ["integer", "null"]},
        "max": {"type": ["integer", "null"]},
        "live": {"oneOf": [_RANGE, {"type": "null"}]},
    },
}

_NULLABLE_NUM: Schema = {"type": ["number", "null"]}
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}

INSTANCE: Schema = {
    "type": "object",
    "required": [
        "name",
        "app",
        "kind",
        "state",
        "desired",
        "pid",
        "command",
        "restarts",
        "exit_code",
        "started_at",
        "uptime",
        "branch",
        "stop_step",
        "reason",
    ],
    "properties": {
        "name": NAME,
        "app": NAME,
        "kind": {"type": "string", "enum": [k.value for k in Kind]},
        "state": {"type": "string", "enum": [s.value for s in State]},
        "desired": {"type": "string", "enum": [d.value for d in Desired]},
        "pid": _NULLABLE_INT,
        **_SETTABLE,
        # The argv it runs; empty for a celery instance whose app cannot build one.
        "command": {"type": "array", "items": {"type": "string"}},
        "restarts": {"type": "integer", "minimum": 0},
        "exit_code": _NULLABLE_INT,
        "started_at": _NULLABLE_NUM,
        "uptime": _NULLABLE_NUM,
        "stop_step": {"type": ["string", "null"], "enum": [*(s.value for s in StopStep), None]},
        "reason": _NULLABLE_STR,
        "branch": {"type": "string"},
        "created_at": {"type": "number"},
        "node": {"type": ["string", "null"]},
    },
}

#: The values of ``process.groups.Outcome``, written out: a plain branch's API
#: does not import the app actions (tests/unit/test_groups.py checks they agree).
OUTCOMES = ["running", "stopped", "failed", "timeout", "pending", "skipped"]

#: One instance's part of an app action (start, stop, restart of every instance).
ACTION_ITEM: Schema = {
    "type": "object",
    "required": ["name", "outcome", "error", "instance"],
    "properties": {
        "name": NAME,
        "outcome": {"type": "string", "enum": OUTCOMES},
        "error": _NULLABLE_STR,
        "instance": INSTANCE,
    },
}

STATS: Schema = {
    "type": "object",
    "required": ["app", "name", "state", "pid", "cpu_percent", "memory_rss", "processes"],
    "properties": {
        "app": NAME,
        "name": NAME,
        "state": {"type": "string", "enum": [s.value for s in State]},
        "pid": _NULLABLE_INT,
        "uptime": _NULLABLE_NUM,
        "restarts": {"type": "integer"},
        "exit_code": _NULLABLE_INT,
        "cpu_percent": {"type": "number", "minimum": 0},
        "memory_rss": {"type": "integer", "minimum": 0},
        "processes": {"type": "integer", "minimum": 0},
        "branch": {"type": "string"},
        "cgroup": {
            "type": ["object", "null"],
            "description": "what the instance's cgroup counts; null: the branch runs without "
            "cgroups",
            "properties": {
                "memory_current": _NULLABLE_INT,
                "cpu_usage_usec": _NULLABLE_INT,
                "oom_kills": {"type": "integer", "minimum": 0},
            },
        },
        "celery": {"type": ["object", "null"]},
    },
}

#: A branch's Celery workers running now (``app/name``): an app's rate limits
#: are split over its running workers across the cluster.
_RUNNING: Schema = {
    "type": "array",
    "items": {"type": "string"},
    "description": "app/name of its Celery workers running now",
}

BRANCH: Schema = {
    "type": "object",
    "required": ["id", "hostname", "version", "started_at", "capacity"],
    "properties": {
        "id": {"type": "string"},
        "hostname": {"type": "string"},
        "version": {"type": "string"},
        "started_at": {"type": "number"},
        "address": {"type": "string"},
        "capacity": {
            "type": "object",
            "required": ["cpus", "load", "memory_total", "memory_free", "instances"],
            "properties": {
                "cpus": {"type": "integer"},
                "load": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 3,
                    "maxItems": 3,
                },
                "memory_total": {"type": "integer"},
                "memory_free": {"type": "integer"},
                "instances": {"type": "integer"},
                "max_instances": {"type": "integer"},
                "slots": {"type": "integer"},
                "slots_used": {"type": "integer"},
                "free_slots": {"type": "integer"},
                "draining": {"type": "boolean"},
            },
        },
        "epoch": {"type": "integer"},
        "api_url": {"type": "string"},
        "gossip_addr": {"type": "string"},
        "instances": {"type": "array", "items": {"type": "string"}},
        "running": _RUNNING,
        # GET /v1/branch only (the daemon answering; branchctl daemon status)
        "pid": {"type": "integer", "description": "the daemon's process id"},
        "state_dir": {"type": "string", "description": "where it keeps its state"},
        "supervision": {
            "type": "string",
            "enum": ["cgroup-v2", "cgroup-v1-hybrid", "process-group"],
            "description": "how an instance's process tree is kept and ended: cgroup-v2 (a "
            "cgroup of its own, limits by v2 controllers), cgroup-v1-hybrid (tracked in a v2 "
            "cgroup, limits by v1 controllers), process-group (its own session and group; "
            "SIGKILL to the group)",
        },
        "instance_states": {
            "type": "object",
            "description": "this branch's instances by state (every state, 0 included)",
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "cluster": {
            "type": ["object", "null"],
            "description": "null: not in a cluster; else its members by state "
            "(this branch included)",
            "properties": {
                "members": {"type": "object", "additionalProperties": {"type": "integer"}}
            },
        },
    },
}

#: One branch as the membership knows it (``GET /v1/branches``): its state in
#: the cluster beside its record (``capacity`` is null until its record came).
BRANCH_ENTRY: Schema = {
    "type": "object",
    "required": ["id", "state", "incarnation", "self", "age", "api_url", "gossip_addr"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["alive", "suspect", "dead", "left"]},
        "incarnation": {"type": "integer"},
        "epoch": {"type": "integer"},
        "self": {"type": "boolean"},
        "age": {"type": "number", "description": "seconds since its record was refreshed"},
        "since": {"type": "number", "description": "seconds in this state"},
        "api_url": {"type": "string"},
        "gossip_addr": {"type": "string"},
        "hostname": {"type": "string"},
        "version": {"type": "string"},
        "address": {"type": "string"},
        "started_at": {"type": "number"},
        "capacity": {"anyOf": [{"type": "null"}, BRANCH["properties"]["capacity"]]},
        "instances": {"type": "array", "items": {"type": "string"}},
        "running": _RUNNING,
        "instances_stale": {"type": "boolean"},
        "gossip": {
            "type": "object",
            "description": "this branch's own entry only: what its gossip sent, got and "
            "dropped (by reason), and the peer calls it refused",
            "properties": {
                "datagrams_sent": {"type": "integer"},
                "datagrams_received": {"type": "integer"},
                "bytes_sent": {"type": "integer"},
                "bytes_received": {"type": "integer"},
                "datagrams_refused": {"type": "integer"},
                "dropped": {"type": "object", "additionalProperties": {"type": "integer"}},
                "bad_messages": {"type": "integer"},
                "peer_calls_dropped": {"type": "integer"},
                "name_collisions": {"type": "integer"},
                "copies_given_up": {"type": "integer"},
            },
        },
    },
}

KEY_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{8}$"}

_MOVED: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"instance": {"type": "string"}, "to": {"type": "string"}},
    },
}
_NOT_MOVED: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"instance": {"type": "string"}, "error": {"type": "string"}},
    },
}
MOVE: Schema = {
    "type": "object",
    "description": "a move of a draining branch's instances: moving, done, or stopped "
    "(undrained); left: app/name not moved yet (the one under way first)",
    "required": ["state", "left", "moved", "failed"],
    "properties": {
        "state": {"type": "string", "enum": ["moving", "done", "stopped"]},
        "left": {"type": "array", "items": {"type": "string"}},
        "moved": _MOVED,
        "failed": _NOT_MOVED,
    },
}

DRAINING: Schema = {
    "type": "object",
    "required": ["id", "draining"],
    "properties": {
        "id": {"type": "string"},
        "draining": {"type": "boolean"},
        "move": {"oneOf": [{"type": "null"}, MOVE]},
    },
}

KEYS: Schema = {
    "type": "object",
    "required": ["items", "branches", "errors"],
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "installed", "primary"],
                "properties": {
                    "id": KEY_ID,
                    "installed": {"type": "integer", "description": "live branches holding it"},
                    "primary": {"type": "integer", "description": "live branches sealing with it"},
                },
            },
        },
        "branches": {"type": "integer", "description": "live branches that answered"},
        "errors": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

KEY_IN: Schema = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {
        "key": {
            "type": "string",
            "minLength": 1,
            "maxLength": 200,
            "description": "base64 of 32 random bytes (branchctl cluster keys generate)",
        }
    },
}

KEY_STEP: Schema = {
    "type": "object",
    "required": ["branches", "keys"],
    "properties": {
        "branches": {
            "type": "object",
            "description": "each live branch: ok, or why not",
            "additionalProperties": {"type": "string"},
        },
        "keys": {
            "type": "object",
            "properties": {
                "primary": KEY_ID,
                "keys": {"type": "array", "items": KEY_ID},
            },
        },
    },
}

EMPTY: Schema = {"type": "object", "additionalProperties": False}

EXIT_IN: Schema = {
    "type": "object",
    "properties": {"keep": {"type": "boolean", "description": "leave the instances running"}},
    "additionalProperties": False,
}

EXITING: Schema = {
    "type": "object",
    "required": ["exiting", "keep"],
    "properties": {"exiting": {"type": "boolean"}, "keep": {"type": "boolean"}},
}

REOPENED: Schema = {
    "type": "object",
    "required": ["reopened"],
    "properties": {"reopened": {"type": "integer", "minimum": 0}},
}

PING: Schema = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def items(schema: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": schema}},
    }


#: An instance's figures in a listing of its app's (``GET /v1/apps/{app}/stats``).
STATS_ITEM: Schema = {
    "type": "object",
    "required": [*STATS["required"], "branch"],
    "properties": {k: v for k, v in STATS["properties"].items() if k != "celery"},
}

#: An instance that consumes a queue (``GET /v1/apps/{app}/queues/{queue}/consumers``).
CONSUMER_ITEM: Schema = {
    "type": "object",
    "required": ["app", "name", "branch", "state"],
    "properties": {
        "app": NAME,
        "name": NAME,
        "branch": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in State]},
    },
}

#: The values of ``celery.lint.Severity``, written out: a plain branch's API
#: does not import the linter (tests/unit/test_lint.py checks they agree).
SEVERITIES = ["error", "warning", "info"]

#: One trap ``GET /v1/apps/{app}/lint`` found in the app's Celery config.
LINT_ITEM: Schema = {
    "type": "object",
    "required": ["rule", "message", "severity"],
    "properties": {
        "rule": {"type": "string"},
        "message": {"type": "string"},
        "severity": {"type": "string", "enum": SEVERITIES},
    },
}

#: A branch a gathered listing could not reach in time (named, never hidden).
UNREACHABLE: Schema = {
    "type": "object",
    "required": ["branch", "state", "error"],
    "properties": {
        "branch": {"type": "string"},
        "state": {"type": "string"},
        "error": {"type": "string"},
    },
}


def gathered(schema: Schema) -> Schema:
    """A listing gathered from every live branch of a cluster."""
    out = items(schema)
    out["properties"] = {
        **out["properties"],
        "unreachable": {"type": "array", "items": UNREACHABLE},
    }
    return out


#: What POST /v1/apps/{app}/instances answers: the instance, or a count create's.
INSTANCE_CREATED: Schema = {"anyOf": [INSTANCE, items(INSTANCE)]}
APP_ACTION: Schema = items(ACTION_ITEM)
