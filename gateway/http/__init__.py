"""The gateway's HTTP and WebSocket handlers, one module per caller: Twilio's webhooks, Twilio's
media socket, the agents' control API, the outbound API, and the platform's probes."""
