"""The embedded MQTT broker and configs for external brokers (arrives with the MQTT issue)."""
