"""Batch offload: latency-tolerant work sent through the providers' batch APIs at batch prices.

Pure policy (`lines`, `states`, `flush`, `pricing`) beside the I/O: the job and queue store behind
a port (`store`; `sqlite_store` in the gateway's file, `postgres_store` shared by replicas), the
budget holds of items (`reservations`), the provider batch adapters (`adapters/`), the runner task
that validates, submits, polls and collects under leases (`runner`), and the service the HTTP routes
call (`service`).
"""
