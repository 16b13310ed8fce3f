"""Delivery: the part of the runner that talks to destination APIs.

* :mod:`audsync.delivery.http`: :class:`~audsync.delivery.http.HttpClient`, the request policy
  (rate limit, retries with backoff, ``Retry-After``, failure sorting, secret masking) that every
  connector's HTTP calls go through;
* :mod:`audsync.delivery.ratelimit`: the token bucket shared by a run's threads;
* :mod:`audsync.delivery.engine`: :class:`~audsync.delivery.engine.DeliverySettings` and
  :func:`~audsync.delivery.engine.deliver`, which streams batches through a connector from a
  bounded pool of threads and reports each batch's outcome on the calling thread.

Nothing is imported here, so that ``import audsync.delivery.engine`` stays cheap (``requests``
is only loaded by the modules that send).
"""
