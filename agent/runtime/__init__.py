"""The agent's side effects: MQTT, the model store on disk, inference backends, the local API, telemetry."""
