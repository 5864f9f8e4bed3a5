"""The gateway agent: fetch, verify, rebuild and flash nodes."""
