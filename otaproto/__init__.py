"""Shoal's wire and file formats, with no I/O (sans-IO, like h11).

Everything here takes bytes (and, where time matters, the time) as arguments
and returns values, events and bytes to send. Importing this package pulls in
no socket, serial, MQTT or SQLite library; a test enforces it.
"""
