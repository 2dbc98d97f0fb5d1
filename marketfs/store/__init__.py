"""The storage layer: schema migrations, bulk COPY in and out, idempotent writes."""
