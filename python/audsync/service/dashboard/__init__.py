"""The dashboard of ``audsync serve`` (issue 15): server-rendered pages at ``/``.

:func:`mount` adds them to the service's app: the syncs of a workspace, a sync with its run
history, charts and row errors, a run, and sign-in with an API token. Templates and static
files ship in the package (``templates/``, ``static/``); nothing is fetched from elsewhere.
"""

from .pages import Dashboard, mount

__all__ = ["Dashboard", "mount"]
