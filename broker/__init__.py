"""MQTT brokers for Shoal, both enforcing the access policy of :mod:`otaproto.topics`.

* :mod:`broker.embedded` — an MQTT 3.1.1 broker in the orchestrator's process
  (amqtt, with Shoal's own authentication and topic ACL plugins), for
  development, tests and small fleets.
* :mod:`broker.mosquitto` — the configuration (listener, password file, ACL
  file) for a production mosquitto 2.0, generated from the registry.
"""
