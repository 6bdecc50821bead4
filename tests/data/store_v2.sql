PRAGMA user_version = 2;
BEGIN TRANSACTION;
CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        env TEXT NOT NULL,            -- JSON object
        defaults TEXT NOT NULL,       -- JSON object
        created_at REAL NOT NULL
    , celery TEXT NOT NULL DEFAULT '{}');
INSERT INTO "apps" VALUES('plain','{"A": "1"}','{"startsecs": 2}',1000.5,'{"broker": null, "celery_app": null, "python": null, "pool": "prefork", "args": [], "autoscale": null, "mingle_gossip": false, "result_backend": null}');
INSERT INTO "apps" VALUES('shop','{"DJANGO_SETTINGS_MODULE": "shop.settings"}','{"queues": ["default"], "loglevel": "DEBUG"}',2000.25,'{"broker": "amqp://guest:guest@127.0.0.1:5672//", "celery_app": "shop.tasks", "python": "/srv/venv/bin/python", "pool": "solo", "args": ["--max-tasks-per-child", "10"], "autoscale": {"min": 1, "max": 4}, "mingle_gossip": true, "result_backend": "redis://127.0.0.1:6379/1"}');
INSERT INTO "apps" VALUES('gone','{}','{}',3000.0,'{"broker": null, "celery_app": null, "python": null, "pool": "prefork", "args": [], "autoscale": null, "mingle_gossip": false, "result_backend": null}');
CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        spec TEXT NOT NULL,           -- JSON of spec_to_dict() without "desired"
        desired TEXT NOT NULL,
        -- Runtime; the defaults are those of model.Runtime().
        state TEXT NOT NULL DEFAULT 'stopped',
        pid INTEGER,
        create_time REAL,
        started_at REAL,
        restarts INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        stop_step TEXT,
        reason TEXT
    );
INSERT INTO "instances" VALUES('p1','plain','{"app": "plain", "name": "p1", "command": ["sleep", "60"], "branch": "0123456789abcdef0123456789abcdef", "kind": "process", "env": {"B": "two"}, "cwd": "/tmp", "user": "nobody", "policy": {"autorestart": "always", "exitcodes": [0, 2], "startsecs": 0.5, "startretries": 7, "stopsignal": "INT", "stopwaitsecs": 20.0}, "autostart": false, "log_max_bytes": 1234, "log_backups": 2, "created_at": 1001.0, "queues": [], "autoscale": null, "concurrency": null, "pool": null, "args": [], "loglevel": "INFO", "hung_after": 60.0, "memory_limit": null}','stopped','stopped',NULL,NULL,NULL,0,NULL,NULL,NULL);
INSERT INTO "instances" VALUES('p2','plain','{"app": "plain", "name": "p2", "command": ["true"], "branch": "0123456789abcdef0123456789abcdef", "kind": "process", "env": {}, "cwd": null, "user": null, "policy": {"autorestart": "on-failure", "exitcodes": [0], "startsecs": 1.0, "startretries": 3, "stopsignal": "TERM", "stopwaitsecs": 10.0}, "autostart": true, "log_max_bytes": 10485760, "log_backups": 5, "created_at": 1002.0, "queues": [], "autoscale": null, "concurrency": null, "pool": null, "args": [], "loglevel": "INFO", "hung_after": 60.0, "memory_limit": null}','running','exited',4242,1700000001.5,1700000002.0,3,-9,'kill','stopwaitsecs ran out');
INSERT INTO "instances" VALUES('w1','shop','{"app": "shop", "name": "w1", "command": [], "branch": "0123456789abcdef0123456789abcdef", "kind": "celery", "env": {}, "cwd": null, "user": null, "policy": {"autorestart": "on-failure", "exitcodes": [0], "startsecs": 30.0, "startretries": 3, "stopsignal": "TERM", "stopwaitsecs": 600.0}, "autostart": true, "log_max_bytes": 10485760, "log_backups": 5, "created_at": 2001.0, "queues": ["default", "images"], "autoscale": {"min": 2, "max": 8}, "concurrency": null, "pool": "threads", "args": ["-E"], "loglevel": "WARNING", "hung_after": 90.0, "memory_limit": 536870912}','running','running',777,1.25,2.5,0,NULL,NULL,NULL);
INSERT INTO "instances" VALUES('w2','shop','{"app": "shop", "name": "w2", "command": [], "branch": "0123456789abcdef0123456789abcdef", "kind": "celery", "env": {}, "cwd": null, "user": null, "policy": {"autorestart": "on-failure", "exitcodes": [0], "startsecs": 1.0, "startretries": 3, "stopsignal": "TERM", "stopwaitsecs": 10.0}, "autostart": true, "log_max_bytes": 10485760, "log_backups": 5, "created_at": 2002.0, "queues": ["default"], "autoscale": null, "concurrency": 3, "pool": null, "args": [], "loglevel": "INFO", "hung_after": 60.0, "memory_limit": null}','running','stopped',NULL,NULL,NULL,0,NULL,NULL,NULL);
INSERT INTO "instances" VALUES('g1','gone','{"app": "gone", "name": "g1", "command": ["sleep", "1"], "branch": "0123456789abcdef0123456789abcdef", "kind": "process", "env": {}, "cwd": null, "user": null, "policy": {"autorestart": "on-failure", "exitcodes": [0], "startsecs": 1.0, "startretries": 3, "stopsignal": "TERM", "stopwaitsecs": 10.0}, "autostart": true, "log_max_bytes": 10485760, "log_backups": 5, "created_at": 3001.0, "queues": [], "autoscale": null, "concurrency": null, "pool": null, "args": [], "loglevel": "INFO", "hung_after": 60.0, "memory_limit": null}','removed','stopped',NULL,NULL,NULL,0,NULL,NULL,NULL);
CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
INSERT INTO "meta" VALUES('branch_id','0123456789abcdef0123456789abcdef');
INSERT INTO "meta" VALUES('removing_app:gone','1');
CREATE TABLE queues (
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        exchange TEXT,
        exchange_type TEXT NOT NULL,
        routing_key TEXT,
        options TEXT NOT NULL,        -- JSON object
        PRIMARY KEY (app, name)
    );
INSERT INTO "queues" VALUES('shop','default',NULL,'direct',NULL,'{}');
INSERT INTO "queues" VALUES('shop','images','media','topic','image.#','{"durable": true}');
CREATE INDEX instances_by_app ON instances(app, name);
COMMIT;
