"""supervisord configs into branchd declarations, for ``branchctl import``.

``ini`` reads the files (with ``[include]``) into sections whose every value
knows its file:line; ``convert`` turns them into apps and instances (the one
table of what each supervisord option becomes is there), with ``celery``
reading a Celery worker's command line; ``plan`` compares that with what a
branch holds. All of it is pure but for the ``Reader`` it is given.
"""
