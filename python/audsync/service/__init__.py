"""``audsync serve``: the audience-sync REST API, the scheduler and the sync lifecycle (api.md).

Layout: the data layer (:mod:`.workspaces`, :mod:`.syncs`, :mod:`.runs`, :mod:`.scheduler`)
knows nothing of HTTP, so that the dashboard's pages reuse it; :mod:`.app` maps it to the
REST endpoints, and :mod:`.errors` holds the JSON error shape both share.
"""
