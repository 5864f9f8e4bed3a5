"""The embedded MQTT broker and configuration for external brokers (arrives with the MQTT backbone issue)."""
