"""The coordinator's read-only web dashboard: a small typed JSON API and one static page.

- :mod:`coordinator.dashboard.models`: the API's response types (pydantic);
- :mod:`coordinator.dashboard.queries`: builds them from the state DB (:class:`coordinator.db.StateDB`
  methods and typed step results) and the jobs' run folders, nothing else;
- :mod:`coordinator.dashboard.server`: the aiohttp server, in a thread of its own beside the gRPC
  servers and the hivemind DHT (``umm-coordinator run --dashboard HOST:PORT``);
- ``static/``: the page (plain HTML, CSS and JS; it reads only the API and writes every value with
  ``textContent``).
"""
