"""The orchestrator's core: registry, artifacts, deployments, outbox, blocks, operator API.

Driven by function calls only (:class:`orchestrator.core.Orchestrator`); the MQTT
service around it lives in the composition root.
"""
