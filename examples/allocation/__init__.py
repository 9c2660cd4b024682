"""The allocation service of *Architecture Patterns with Python*, built on uow.

Batches of stock are allocated to order lines. ``Product`` is the aggregate:
every change to the batches of one SKU goes through it, and its
``version_number`` guards against two concurrent changes to the same SKU.

* :mod:`allocation.domain` — the model and its events, with no SQLAlchemy in it;
* :mod:`allocation.orm` — the imperative mapping of the model;
* :mod:`allocation.repository` — the product repository, its query method and
  its SQLAlchemy and in-memory implementations;
* :mod:`allocation.unit_of_work` — the units of work declared with uow;
* :mod:`allocation.services` and :mod:`allocation.messagebus` — the service
  layer and the loop that hands domain events to their handlers;
* :mod:`allocation.cli` — ``python -m allocation``, a short end-to-end scenario;
* :mod:`allocation.flask_app` and :mod:`allocation.fastapi_app` — the service
  over HTTP, with Flask and with FastAPI.
"""
