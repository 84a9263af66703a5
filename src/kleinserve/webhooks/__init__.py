"""Webhooks: a POST to the job's ``webhook_url`` when it finishes, signed as Standard Webhooks say.

- ``signing.py``: secrets (the server's, and one per API key derived from it) and signatures;
- ``store.py``: deliveries and their attempts, durable (``WebhookStore``; SQLite here,
  PostgreSQL in ``kleinserve.postgres.webhooks``);
- ``dispatcher.py``: turns finished jobs into deliveries and sends them, with retries.
"""
