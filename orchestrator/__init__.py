"""The orchestrator: registry, artifact store, rollouts (arrives with the MQTT backbone issue)."""
